"""The entmax selection rule (DashAttention): plain-torch semantics, state and reference.

Stage 1, block summaries: one key per full block, an attention pool of the block's keys
with a learned vector w per KV head (softmax over the block of k.w; w = 0 gives the mean).
Stage 2, selection: scores s = c q.k_bar / sqrt(D) over the *candidate* blocks, i.e. the
full blocks that are neither sink blocks nor among the last `local_blocks` blocks (those are
always attended); alpha-entmax over the candidates per query head, tau by Halley steps with
a bisection fallback inside [max - 1, max - n^(1 - alpha)] (on z = (alpha - 1) s); the G
heads' probabilities are averaged; the selection is the support plus the always-on blocks,
in ascending block order.
Stage 3, attention: softmax over the tokens of the selected blocks with log p_bar added to
the logits of each candidate block's tokens (the prior; always-on blocks get 0, as if p = 1).

The tau solve runs a fixed number of Halley steps (`halley_iters`, the spec's), then
normalizes p to sum to 1: the Triton kernel runs the same steps, so both pick the same
support. `entmax_tau(..., iters=50)` in fp64 is the converged reference.

Prefill (training) uses the same rule per query block, with the block's mean query as its
query; the block level runs in torch autograd (TorchBlockOps) or the Triton kernels of
sparsegen.codegen.entmax_pool, the token level in `token_attention` (torch) or the Triton
kernels (sparsegen.codegen.entmax_kernels), so gradients reach q, k, v and w.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kv_cache import capturing
from .selection import always_on, ascending_lists, mask_to_indices, num_blocks
from .sparse_decode_ref import sparse_decode_reference

NEG_INF = float("-inf")


@dataclass(frozen=True)
class EntmaxRule:
    block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 1
    alpha: float = 1.5
    scale: float = 1.0
    halley_iters: int = 4
    prior: bool = True

    @classmethod
    def from_spec(cls, spec) -> "EntmaxRule":
        s, e = spec.selection, spec.selection.entmax
        return cls(s.block_size, s.sink_blocks, s.local_blocks, e.alpha, e.scale,
                   e.halley_iters, e.prior)

    def score_coef(self, head_dim: int) -> float:
        """Factor from q.k_bar to z = (alpha - 1) s, the variable tau is solved on."""
        return (self.alpha - 1.0) * self.scale / math.sqrt(head_dim)


# ---------------------------------------------------------------------------------------
# alpha-entmax
# ---------------------------------------------------------------------------------------
def _moments(x: torch.Tensor, k: float):
    """f = sum x^k - 1 and its first two derivatives in tau (x = [z - tau]_+)."""
    pos = x > 0
    if k == 2.0:  # alpha = 1.5: the kernel's specialization, exact in floating point
        return ((x * x).sum(-1) - 1, -2 * x.sum(-1), 2 * pos.sum(-1).to(x.dtype))
    if k == 1.0:  # alpha = 2 (sparsemax)
        return x.sum(-1) - 1, -pos.sum(-1).to(x.dtype), torch.zeros_like(x[..., 0])
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xs = torch.where(pos, x, torch.ones_like(x))  # keeps negative powers finite off-support
    f = torch.where(pos, xs.pow(k), zero).sum(-1) - 1
    f1 = -k * torch.where(pos, xs.pow(k - 1), zero).sum(-1)
    f2 = k * (k - 1) * torch.where(pos, xs.pow(k - 2), zero).sum(-1)
    return f, f1, f2


def entmax_tau(z: torch.Tensor, alpha: float, iters: int):
    """tau of alpha-entmax along the last dim of z = (alpha - 1) s (-inf = not a candidate).

    Returns (tau, has) where has marks rows with at least one candidate. Halley steps from
    the bracket's midpoint; a step that leaves the bracket (or is not finite) is
    replaced by the bracket's midpoint; the bracket shrinks with the sign of f each step.
    """
    k = 1.0 / (alpha - 1.0)
    cnt = (z > NEG_INF).sum(-1)
    has = cnt > 0
    zmax = torch.where(has, z.amax(-1), torch.zeros((), dtype=z.dtype, device=z.device))
    lo = zmax - 1.0
    hi = zmax - cnt.clamp_min(1).to(z.dtype).pow(1.0 - alpha)
    tau = 0.5 * (lo + hi)  # from the midpoint: 4 steps reach fp64 precision up to n = 8192
    for _ in range(iters):
        x = (z - tau[..., None]).clamp_min(0)
        f, f1, f2 = _moments(x, k)
        lo = torch.where(f > 0, tau, lo)
        hi = torch.where(f < 0, tau, hi)
        denom = 2 * f1 * f1 - f * f2
        ok = denom != 0
        step = tau - 2 * f * f1 / torch.where(ok, denom, torch.ones_like(denom))
        inside = ok & (step >= lo) & (step <= hi)
        tau = torch.where(f == 0, tau, torch.where(inside, step, 0.5 * (lo + hi)))
    return tau, has


def entmax_forward(s: torch.Tensor, valid: torch.Tensor, alpha: float, iters: int):
    """p = normalize([(alpha - 1) s - tau]_+^(1/(alpha-1))) over the valid entries."""
    z = torch.where(valid, (alpha - 1.0) * s, torch.full_like(s, NEG_INF))
    tau, _ = entmax_tau(z, alpha, iters)
    x = (z - tau[..., None]).clamp_min(0)
    p = x * x if alpha == 1.5 else x.pow(1.0 / (alpha - 1.0))
    total = p.sum(-1, keepdim=True)
    return p / torch.where(total > 0, total, torch.ones_like(total))


class _Entmax(torch.autograd.Function):
    """alpha-entmax with its closed-form backward (exact once tau has converged):
    dL/ds = g * (dL/dp - sum(g dL/dp) / sum(g)), g = p^(2 - alpha) on the support."""

    @staticmethod
    def forward(ctx, s, valid, alpha, iters):
        p = entmax_forward(s.detach(), valid, alpha, iters)
        ctx.save_for_backward(p)
        ctx.alpha = alpha
        return p

    @staticmethod
    def backward(ctx, dp):
        (p,) = ctx.saved_tensors
        g = torch.where(p > 0, p.pow(2.0 - ctx.alpha), torch.zeros_like(p))
        dx = dp * g
        denom = g.sum(-1, keepdim=True)
        dx = dx - g * dx.sum(-1, keepdim=True) / torch.where(denom > 0, denom,
                                                               torch.ones_like(denom))
        return dx, None, None, None


def entmax(s: torch.Tensor, valid: torch.Tensor | None = None, alpha: float = 1.5,
           iters: int = 4) -> torch.Tensor:
    """Differentiable alpha-entmax over the last dim; `valid` masks candidates."""
    if valid is None:
        valid = torch.ones_like(s, dtype=torch.bool)
    return _Entmax.apply(s, valid.expand_as(s), alpha, iters)


# ---------------------------------------------------------------------------------------
# Block summaries
# ---------------------------------------------------------------------------------------
def pool_blocks(kb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Attention pool of blocks kb [..., Hkv, n, bs, D] with w [Hkv, D] -> [..., Hkv, n, D]
    (computed in kb's dtype: callers pass fp32/fp64)."""
    a = torch.softmax(torch.einsum("...hntd,hd->...hnt", kb, w.to(kb.dtype)), dim=-1)
    return torch.einsum("...hnt,...hntd->...hnd", a, kb)


def block_summaries(k: torch.Tensor, w: torch.Tensor, block_size: int,
                    compute_dtype=None) -> torch.Tensor:
    """Summaries of the full blocks of k [B, T, Hkv, D] -> [B, Hkv, T // block_size, D]."""
    B, T, H, D = k.shape
    n = T // block_size
    kb = k[:, : n * block_size].reshape(B, n, block_size, H, D).permute(0, 3, 1, 2, 4)
    if compute_dtype is not None:
        kb = kb.to(compute_dtype)
    return pool_blocks(kb, w)


class EntmaxPool(torch.nn.Module):
    """The learned block-summary pooling of DashAttention: one vector per KV head, the
    softmax over a block of k . w weighs its keys (zeros: the mean). Trained through the
    prefill (EntmaxDecoder.prefill_attention), read by the decode summaries."""

    def __init__(self, num_kv_heads: int, head_dim: int, weight: torch.Tensor | None = None):
        super().__init__()
        w = torch.zeros(num_kv_heads, head_dim) if weight is None else weight.detach().clone()
        if tuple(w.shape) != (num_kv_heads, head_dim):
            raise ValueError(f"pool weight must be [num_kv_heads, head_dim] = "
                             f"[{num_kv_heads}, {head_dim}], got {tuple(w.shape)}")
        self.w = torch.nn.Parameter(w)


# ---------------------------------------------------------------------------------------
# Decode selection
# ---------------------------------------------------------------------------------------
@dataclass
class Selection:
    """Selected blocks per KV head, ascending, padded with -1 (decode_api layout)."""

    indices: torch.Tensor  # [B, Hkv, width] int32
    counts: torch.Tensor   # [B, Hkv] int32
    bias: torch.Tensor     # [B, Hkv, width] log p_bar (0 for always-on, or no prior); the
                           # kernels take fp32, the torch path keeps its compute dtype

    def blocks(self, b: int, h: int) -> list[int]:
        return self.indices[b, h, : int(self.counts[b, h])].tolist()


def candidate_range(lengths: torch.Tensor, rule: EntmaxRule):
    """(num_blocks, end of candidates) per sequence: candidates are [sink, cand_end)."""
    nb = num_blocks(lengths, rule.block_size)
    return nb, (nb - rule.local_blocks).clamp_min(rule.sink_blocks)


def compact(mask: torch.Tensor, bias: torch.Tensor, width: int | None = None) -> Selection:
    """Ascending indices of the set entries of mask [B, H, NB] (-1 padded to width), with
    the bias of each selected block."""
    idx, counts = mask_to_indices(mask, mask.shape[-1] if width is None else width)
    live = idx >= 0
    if idx.shape[-1] > bias.shape[-1]:
        bias = torch.nn.functional.pad(bias, (0, idx.shape[-1] - bias.shape[-1]))
    zero = torch.zeros((), dtype=bias.dtype, device=bias.device)
    b = torch.where(live, bias.gather(-1, idx.long().clamp_min(0)), zero)
    return Selection(idx, counts, b)


def select_blocks(q: torch.Tensor, summaries: torch.Tensor, lengths: torch.Tensor,
                  rule: EntmaxRule, width: int | None = None,
                  compute_dtype=torch.float32, return_probs: bool = False):
    """The decode selection of one step (torch).

    q [B, Hq, D]; summaries [B, Hkv, >= cand_end, D] (rows past a sequence's full blocks are
    never read); lengths [B] (tokens including the current one). Returns a Selection (and
    p_bar [B, Hkv, J] over the candidate columns when asked).
    """
    B, Hq, D = q.shape
    Hkv = summaries.shape[1]
    G = Hq // Hkv
    lengths = lengths.to(device=q.device, dtype=torch.long)
    nb, cand_end = candidate_range(lengths, rule)
    NB = int(nb.max()) if B else 0
    J = int(cand_end.max()) if B else 0
    j = torch.arange(J, device=q.device)
    valid = (j >= rule.sink_blocks) & (j < cand_end[:, None])  # [B, J]
    qg = q.reshape(B, Hkv, G, D).to(compute_dtype)
    s = torch.einsum("bhgd,bhjd->bhgj", qg, summaries[:, :, :J].to(compute_dtype))
    s = s * (rule.scale / math.sqrt(D))
    p = entmax_forward(s, valid[:, None, None, :], rule.alpha, rule.halley_iters)
    pbar = p.mean(2)  # [B, Hkv, J]
    mask = always_on(nb, NB, rule.sink_blocks, rule.local_blocks)[:, None, :].expand(
        B, Hkv, NB).clone()
    chosen = valid[:, None, :] & (pbar > 0)
    mask[..., :J] |= chosen
    bias = torch.zeros(B, Hkv, NB, dtype=compute_dtype, device=q.device)
    if rule.prior:
        bias[..., :J] = torch.where(chosen, pbar.clamp_min(torch.finfo(pbar.dtype).tiny).log(),
                                    bias[..., :J])
    sel = compact(mask, bias, width)
    return (sel, pbar) if return_probs else sel


# ---------------------------------------------------------------------------------------
# Decoder state: summaries beside the KV cache
# ---------------------------------------------------------------------------------------
class EntmaxDecoder:
    """One layer's entmax decode: summaries kept beside the KV cache, one call per step.

    `selector(q, summaries, seq_lens, lengths)` -> Selection defaults to the torch rule
    (`select_blocks`); the tau kernels (sparsegen.codegen.entmax_tau.EntmaxTau) have the same
    signature.
    `attend` follows decode_api plus `block_bias=` (the Triton EntmaxDecodeTriton; None is
    sparse_decode_reference) and is called with keywords, as in decode_step.
    `append_impl`: "triton" appends and writes a filling block's summary in one launch that
    finds the block on the device (sparsegen.codegen.summary_append), "torch" appends and
    summarizes on the host's lengths; "auto" = triton on CUDA.

    With the generated kernels (a selector, an `attend`, the triton append) a step reads
    lengths only on the device, so decode steps can be captured in a CUDA graph: reserve
    the pages of a paged cache first, and after each later replay call `cache.replayed`
    (the summaries live on the device and need nothing).
    """

    def __init__(self, rule: EntmaxRule, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 pool: EntmaxPool | None = None, selector=None,
                 compute_dtype=torch.float32, prefill_attention=None,
                 append_impl: str = "auto"):
        if append_impl not in ("auto", "torch", "triton"):
            raise ValueError(f"append_impl must be auto, torch or triton, not {append_impl!r}")
        self.rule = rule
        self.append_impl = append_impl
        self._appenders: dict = {}  # cache and new k/v facts -> TritonSummaryAppend
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.pool = pool if pool is not None else EntmaxPool(num_kv_heads, head_dim)
        self.compute_dtype = compute_dtype
        self.selector = selector
        # token level of the training prefill (EntmaxPrefillTriton.attention); None: torch
        self.prefill_kernel = prefill_attention
        self.summaries = None  # [B, Hkv, capacity blocks, D] in the cache dtype
        self.last_selection: Selection | None = None

    @property
    def w(self) -> torch.Tensor:
        """The pooling vectors as they are now (a trained pool changes the summaries of the
        blocks that fill from then on)."""
        return self.pool.w.detach()

    @classmethod
    def from_spec(cls, spec, **kw) -> "EntmaxDecoder":
        m = spec.model
        return cls(EntmaxRule.from_spec(spec), m.num_q_heads, m.num_kv_heads, m.head_dim, **kw)

    def _ensure_state(self, cache) -> None:
        if self.summaries is None or self.summaries.shape[0] != cache.batch:
            blocks = math.ceil(cache.capacity / self.rule.block_size)
            self.summaries = torch.zeros(cache.batch, cache.kv_heads, blocks, cache.head_dim,
                                         dtype=cache.k.dtype, device=cache.device)
            self.pool.to(cache.device)

    def _summarize(self, kb: torch.Tensor) -> torch.Tensor:
        """kb [n, bs, Hkv, D] -> [Hkv, n, D] in the summary dtype."""
        x = kb.to(self.compute_dtype).permute(2, 0, 1, 3)
        return pool_blocks(x, self.w).to(self.summaries.dtype)

    def prefill(self, cache, k: torch.Tensor, v: torch.Tensor, lengths=None) -> None:
        """Append prompts k, v [B, T, Hkv, D] (sequence b keeps its first lengths[b]) and
        summarize every full block in one pass per sequence."""
        self._ensure_state(cache)
        bs = self.rule.block_size
        lengths = cache.prefill_lengths(k, v, lengths)
        for b, n in enumerate(lengths):
            start, stop = cache.extend(b, k[b, :n], v[b, :n])
            first, last = math.ceil(start / bs), stop // bs  # blocks completed by this write
            if last > first:
                kk, _ = cache.tokens(b, first * bs, last * bs)
                self.summaries[b, :, first:last] = self._summarize(
                    kk.reshape(last - first, bs, cache.kv_heads, cache.head_dim))

    def _after_append(self, cache) -> None:
        bs = self.rule.block_size
        full = [b for b, n in enumerate(cache.lengths) if n % bs == 0]
        if not full:
            return
        if len(full) == cache.batch and cache.block_table is None \
                and len(set(cache.lengths)) == 1:  # common case: one batched pool
            n = cache.lengths[0]
            kb = cache.k[:, n - bs:n]  # [B, bs, Hkv, D]
            x = kb.to(self.compute_dtype).permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, bs, D]
            self.summaries[:, :, n // bs - 1] = pool_blocks(x, self.w)[:, :, 0].to(
                self.summaries.dtype)
            return
        for b in full:
            n = cache.lengths[b]
            kk, _ = cache.tokens(b, n - bs, n)
            self.summaries[b, :, n // bs - 1] = self._summarize(kk[None])[:, 0]

    def _summary_append(self, cache, new_dtype):
        """The one-launch append + summary for this cache (None: the torch path)."""
        if self.append_impl == "torch" or (self.append_impl == "auto" and not cache.k.is_cuda):
            return None
        key = (cache.k.dtype, new_dtype, cache.layout, cache.page_size, cache.kv_heads,
               cache.head_dim)
        kern = self._appenders.get(key)
        if kern is None:
            from ..codegen.kv_append import AppendStatic
            from ..codegen.summary_append import SummaryAppendStatic, TritonSummaryAppend
            from ..codegen.triton_kernel import dtype_name

            append = AppendStatic(cache.head_dim, cache.kv_heads, dtype_name(cache.k.dtype),
                                  dtype_name(new_dtype), cache.layout, cache.page_size)
            kern = self._appenders[key] = TritonSummaryAppend.shared(
                SummaryAppendStatic(append, self.rule.block_size))
        return kern

    def select(self, q: torch.Tensor, cache) -> Selection:
        if self.selector is not None:
            # under capture the host's lengths are those of the capture, not of a replay
            lengths = None if capturing(q) else cache.lengths
            return self.selector(q, self.summaries, cache.seq_lens, lengths)
        lengths = torch.tensor(cache.lengths, device=q.device)
        width = self.summaries.shape[2]
        return select_blocks(q, self.summaries, lengths, self.rule, width=width,
                             compute_dtype=self.compute_dtype)

    def step(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache,
             attend=None) -> torch.Tensor:
        """Append the token's k/v [B, Hkv, D], update summaries, select, attend."""
        self._ensure_state(cache)
        fold = self._summary_append(cache, k_new.dtype)
        if capturing(q) and (fold is None or self.selector is None or attend is None):
            raise RuntimeError("an entmax decode step is captured in a CUDA graph only with "
                               "the generated kernels (selector, attend and the triton append: "
                               "the emitted layer's), whose step reads lengths on the device")
        if fold is None:
            cache.append(k_new, v_new)
            self._after_append(cache)
        else:
            w = self.w.to(device=cache.device, dtype=torch.float32).contiguous()
            cache.append(k_new, v_new, meta=(self.summaries, w), kernel=fold)
        sel = self.select(q, cache)
        self.last_selection = sel
        if attend is None:
            out = sparse_decode_reference(q, cache.k, cache.v, sel.indices, sel.counts,
                                          cache.seq_lens, self.rule.block_size,
                                          block_table=cache.block_table,
                                          block_bias=sel.bias if self.rule.prior else None,
                                          compute_dtype=self.compute_dtype, validate=False)
            return out.to(q.dtype)
        # keywords: both decode_step's attend(q, block_indices, block_counts, k, v, seq_lens,
        # block_table) and the kernel adapters' (q, k, v, block_indices, ...) accept this
        return attend(q, block_indices=sel.indices, block_counts=sel.counts,
                      block_bias=sel.bias if self.rule.prior else None,
                      **cache.attention_args())

    def prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          sm_scale: float | None = None) -> torch.Tensor:
        """The method's training forward over prompts q [B, T, Hq, D], k, v [B, T, Hkv, D]:
        causal block-sparse entmax attention (entmax_prefill), differentiable in q, k, v and
        the pool's w. The generated kernels run it for 16-bit CUDA inputs, torch otherwise."""
        fast = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
        out, _ = entmax_prefill(q, k, v, self.pool.w, self.rule,
                                attention=self.prefill_kernel if fast else None,
                                sm_scale=sm_scale)
        return out


# ---------------------------------------------------------------------------------------
# Prefill (training): block level through `block_ops` (torch or Triton), token level pluggable
# ---------------------------------------------------------------------------------------
@dataclass
class PrefillSelection:
    """Block-level selection of a causal prefill, per KV head and query block."""

    mask: torch.Tensor     # [B, Hkv, nq, nk] bool, selected key blocks (diagonal included)
    bias: torch.Tensor     # [B, Hkv, nq, nk] prior (differentiable; 0 off the candidates)
    pbar: torch.Tensor     # [B, Hkv, nq, J] group-averaged probabilities (J = full blocks)

    def lists(self):
        """Ascending forward lists [B, Hkv, nq, nk] + counts and reverse (per key block)
        lists [B, Hkv, nk, nq] + counts, int32, padded with -1: what the kernels read."""
        fi, fc = ascending_lists(self.mask)
        ri, rc = ascending_lists(self.mask.transpose(-1, -2))
        return fi, fc, ri, rc


def _promoted(x: torch.Tensor):
    """fp32 for 16-bit inputs, else x's dtype (fp64 stays fp64 for gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


class TorchBlockOps:
    """Block level of the prefill in plain torch autograd (CPU, fp64, reference). Reads the
    16-bit q through a reduction with fp32 accumulation (no fp32 copy of q); k is cast per
    block pool. The GPU twin is sparsegen.codegen.entmax_pool.EntmaxPoolTriton."""

    @staticmethod
    def pool_q(q: torch.Tensor, block_size: int) -> torch.Tensor:
        """Mean of each query block's rows: [B, T, Hq, D] -> [B, Hq, ceil(T / bs), D]."""
        B, T, Hq, D = q.shape
        J, dt = T // block_size, _promoted(q)
        parts = [q[:, : J * block_size].reshape(B, J, block_size, Hq, D).sum(2, dtype=dt)
                 / block_size]
        if T > J * block_size:  # the partial last block: mean of its rows
            parts.append(q[:, J * block_size:].sum(1, keepdim=True, dtype=dt)
                         / (T - J * block_size))
        return torch.cat(parts, 1).permute(0, 2, 1, 3)

    @staticmethod
    def pool_k(k: torch.Tensor, w: torch.Tensor, block_size: int) -> torch.Tensor:
        """Summaries of the full blocks: [B, T, Hkv, D] -> [B, Hkv, T // bs, D]."""
        return block_summaries(k, w, block_size, _promoted(k))

    @staticmethod
    def entmax_pbar(s: torch.Tensor, rule: EntmaxRule) -> torch.Tensor:
        """Group mean of the entmax of s [B, Hkv, G, nq, J] over the candidates."""
        valid = prefill_candidates(*s.shape[-2:], rule, s.device)
        return entmax(s, valid.expand_as(s), rule.alpha, rule.halley_iters).mean(2)


def prefill_candidates(nq: int, J: int, rule: EntmaxRule, device) -> torch.Tensor:
    """[nq, J] bool: the key blocks query block i's entmax ranges over (j in
    [sink, i - local])."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(J, device=device)[None, :]
    return (j >= rule.sink_blocks) & (j <= i - rule.local_blocks)


TORCH_BLOCK_OPS = TorchBlockOps()


def prefill_block_ops(q: torch.Tensor, num_kv_heads: int, rule: EntmaxRule, block_ops="auto"):
    """"auto": the Triton block level (EntmaxPoolTriton) for 16-bit CUDA inputs, the torch
    one otherwise; None: torch; anything else is used as given."""
    if block_ops is None:
        return TORCH_BLOCK_OPS
    if isinstance(block_ops, str):
        if block_ops != "auto":
            raise ValueError(f"block_ops={block_ops!r}: give 'auto', None or an ops object")
        if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            from ..codegen.entmax_pool import block_ops_for
            return block_ops_for(q, num_kv_heads, rule)
        return TORCH_BLOCK_OPS
    return block_ops


def prefill_selection(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor,
                      rule: EntmaxRule, block_ops=None) -> PrefillSelection:
    """q [B, T, Hq, D], k [B, T, Hkv, D], w [Hkv, D]; differentiable in q, k, w. The block
    level computes in fp32 (fp64 for fp64 inputs) whatever q/k's dtype; `block_ops` (see
    prefill_block_ops; None is torch) pools q and k and runs the entmax."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] \
            or q.shape[3] != k.shape[3] or k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, T, Hq, D] and "
                         f"[B, T, Hkv, D] with Hq a multiple of Hkv")
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"q {tuple(q.shape)}: entmax prefill attention needs a batch of "
                         "prompts of at least one token")
    if tuple(w.shape) != (k.shape[2], k.shape[3]):
        raise ValueError(f"w must be [Hkv, D] = [{k.shape[2]}, {k.shape[3]}], got "
                         f"{tuple(w.shape)}")
    ops = prefill_block_ops(q, k.shape[2], rule, block_ops)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G, bs = Hq // Hkv, rule.block_size
    nq = math.ceil(T / bs)
    J = T // bs  # full key blocks: the only ones with a summary
    kbar = ops.pool_k(k, w, bs)  # [B, Hkv, J, D]
    qbar = ops.pool_q(q, bs)     # [B, Hq, nq, D]
    s = torch.einsum("bhgnd,bhjd->bhgnj", qbar.reshape(B, Hkv, G, nq, D), kbar.to(qbar.dtype))
    pbar = ops.entmax_pbar(s * (rule.scale / math.sqrt(D)), rule)  # [B, Hkv, nq, J]
    valid = prefill_candidates(nq, J, rule, q.device)  # [nq, J]
    i = torch.arange(nq, device=q.device)[:, None]
    jj = torch.arange(nq, device=q.device)[None, :]
    always = ((jj < rule.sink_blocks) | (jj > i - rule.local_blocks)) & (jj <= i)  # [nq, nk]
    chosen = valid & (pbar > 0)
    mask = always.expand(B, Hkv, nq, nq).clone()
    mask[..., :J] |= chosen
    bias = torch.zeros(B, Hkv, nq, nq, dtype=pbar.dtype, device=q.device)
    if rule.prior:
        logp = torch.where(chosen, pbar, torch.ones_like(pbar)).log()
        bias = torch.cat([logp, bias[..., J:]], dim=-1) if J else bias
    return PrefillSelection(mask, bias, pbar)


def token_attention(q, k, v, mask, bias, block_size, sm_scale=None, row0: int = 0):
    """Torch path of the token level: causal attention restricted to the selected blocks
    with the block bias on the logits. q [B, Tq, Hq, D] holds the sequence's rows row0 ..
    row0 + Tq; k, v [B, T, Hkv, D] all of it; mask/bias [B, Hkv, nq, nk]. Dense [Tq, T]
    logits: for CPU, small shapes and gradcheck (token_attention_grads chunks the rows)."""
    B, Tq, Hq, D = q.shape
    T, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if sm_scale is None else sm_scale
    rows = torch.arange(row0, row0 + Tq, device=q.device)
    cols = torch.arange(T, device=q.device)
    tok_mask = mask[:, :, rows // block_size][..., cols // block_size]  # [B, Hkv, Tq, T]
    tok_bias = bias[:, :, rows // block_size][..., cols // block_size]
    allowed = (tok_mask & (cols[None, :] <= rows[:, None])).repeat_interleave(G, dim=1)
    logits = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(G, dim=2)) * scale
    logits = logits + tok_bias.repeat_interleave(G, dim=1)
    logits = logits.masked_fill(~allowed, NEG_INF)
    p = torch.softmax(logits, -1)
    return torch.einsum("bhts,bshd->bthd", p, v.repeat_interleave(G, dim=2))


def token_attention_grads(q, k, v, mask, bias, block_size, do, sm_scale=None,
                          chunk_bytes: int = 1 << 30):
    """Reference forward + backward of the token level at any length: (out, dq, dk, dv,
    dbias) in fp32 (fp64 for fp64 inputs) for the output gradient `do`. Autograd through
    token_attention over row chunks whose [B, Hq, rows, T] logits stay near chunk_bytes, so
    memory is linear in T per chunk; the chunks' k, v and bias gradients add up."""
    dt = _promoted(q)
    B, T, Hq, _ = q.shape
    k, v, bias = (t.detach().to(dt).requires_grad_() for t in (k, v, bias))
    rows = max(1, min(T, chunk_bytes // max(1, B * Hq * T * 4)))
    outs, dqs = [], []
    for r0 in range(0, T, rows):
        qc = q[:, r0:r0 + rows].detach().to(dt).requires_grad_()
        with torch.enable_grad():
            o = token_attention(qc, k, v, mask, bias, block_size, sm_scale, row0=r0)
            o.backward(do[:, r0:r0 + rows].to(dt))
        outs.append(o.detach())
        dqs.append(qc.grad)
    return torch.cat(outs, 1), torch.cat(dqs, 1), k.grad, v.grad, bias.grad


def entmax_prefill(q, k, v, w, rule: EntmaxRule, attention=None, sm_scale=None,
                   block_ops="auto"):
    """Causal block-sparse entmax attention of a prompt, differentiable in q, k, v and w.

    `attention(q, k, v, sel, block_size, sm_scale)` runs the token level; None is the
    torch path (token_attention). `block_ops` runs the block level (prefill_block_ops:
    "auto" is Triton for 16-bit CUDA inputs, torch otherwise). Returns (out [B, T, Hq, D],
    PrefillSelection).
    """
    sel = prefill_selection(q, k, w, rule, prefill_block_ops(q, k.shape[2], rule, block_ops))
    if attention is None:
        out = token_attention(q, k, v, sel.mask, sel.bias.to(q.dtype), rule.block_size,
                              sm_scale)
    else:
        out = attention(q, k, v, sel, rule.block_size, sm_scale)
    return out, sel
