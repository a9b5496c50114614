"""The milestone selection rule (RaaS): page timestamps, eviction of the oldest decode page.

Definitions (shared with the tests' independent reference):
- Pages are the cache's pages (page_size tokens). Prefill pages, the first
  ceil(prefill_len / page_size) of a sequence (the last one may be filled by decode tokens),
  are never evicted. Every later page is a decode page and carries a timestamp.
- Decode step t (t = 1, 2, ...): if the new token opens a page and the sequence already
  holds `budget_pages` decode pages, the decode page with the smallest (timestamp, logical
  page) is evicted (KVCache.unmap_page) and the new page reuses its memory. The new page
  gets timestamp t. After the append the live decode pages are scored with the current
  query: per query head, Quest's bound sum_i max(q_i min_i, q_i max_i) / sqrt(D), softmax
  over the live decode pages; the page score is the mean of those probabilities over all
  query heads (pages are evicted whole, for every head, so they are ranked once). The top
  ceil(refresh_fraction * live) pages by (score desc, logical page asc), or those with
  score > refresh_threshold, get timestamp t; so does the page holding the current token.
- Attention covers every prefill page and every live decode page. Hybrid (with
  prefill_budget_tokens): instead of all prefill pages, the top prefill_budget_tokens //
  page_size prefill pages per KV head by the group-summed bound (ties: lower page), plus
  the sink blocks and the last local_blocks blocks; decode pages as above.
Memory: a sequence holds its prefill pages and budget_pages decode pages, taken at prefill.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kv_cache import CacheFullError, capturing
from .sparse_decode_ref import sparse_decode_reference

_BIG = 1 << 40


@dataclass(frozen=True)
class MilestoneRule:
    page_size: int = 16
    block_size: int = 16
    budget_tokens: int = 2048
    refresh_fraction: float | None = 0.5
    refresh_threshold: float | None = None
    prefill_budget_tokens: int | None = None
    sink_blocks: int = 0
    local_blocks: int = 1

    def __post_init__(self):
        if self.page_size % self.block_size:
            raise ValueError("page_size must be a multiple of block_size")
        if (self.refresh_fraction is None) == (self.refresh_threshold is None):
            raise ValueError("give exactly one of refresh_fraction and refresh_threshold")

    @classmethod
    def from_spec(cls, spec) -> "MilestoneRule":
        s, m = spec.selection, spec.selection.milestone
        return cls(spec.cache.page_size, s.block_size, s.budget_tokens, m.refresh_fraction,
                   m.refresh_threshold, m.prefill_budget_tokens, s.sink_blocks, s.local_blocks)

    @property
    def budget_pages(self) -> int:
        return max(1, self.budget_tokens // self.page_size)

    @property
    def blocks_per_page(self) -> int:
        return self.page_size // self.block_size

    @property
    def hybrid(self) -> bool:
        return self.prefill_budget_tokens is not None

    @property
    def prefill_pages_kept(self) -> int:
        return max(1, (self.prefill_budget_tokens or 0) // self.page_size)


# ---------------------------------------------------------------------------------------
# Quest metadata (private; to merge with sparsegen.methods.topk once it exists)
# ---------------------------------------------------------------------------------------
def _quest_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """sum_i max(q_i min_i, q_i max_i) as q.c + |q|.r with c, r the centre and radius of
    the box: two matmuls instead of a [.., pages, D] temporary.
    q [B, Hkv, G, D]; kmin/kmax [B, P, Hkv, D] -> [B, Hkv, G, P]."""
    c = (kmax + kmin) * 0.5
    r = (kmax - kmin) * 0.5
    return (torch.einsum("bhgd,bphd->bhgp", q, c)
            + torch.einsum("bhgd,bphd->bhgp", q.abs(), r))


def page_minmax(k: torch.Tensor, n: int, page_size: int):
    """Element-wise min and max of the keys of each page of k [>= n, Hkv, D] (first n
    tokens) -> two [ceil(n / page_size), Hkv, D]."""
    pages = math.ceil(n / page_size)
    pad = pages * page_size - n
    kk = k[:n]
    lo = torch.nn.functional.pad(kk, (0, 0, 0, 0, 0, pad), value=float("inf"))
    hi = torch.nn.functional.pad(kk, (0, 0, 0, 0, 0, pad), value=float("-inf"))
    H, D = k.shape[1], k.shape[2]
    return (lo.view(pages, page_size, H, D).amin(1), hi.view(pages, page_size, H, D).amax(1))


def torch_page_scores(q, kmin, kmax, slot_phys, sm_scale=None):
    """Page scores of the live decode slots: mean over query heads of the per-head softmax
    (over live slots) of the Quest bound. q [B, Hq, D]; kmin/kmax [pages, Hkv, D];
    slot_phys [B, L] physical page per slot (-1 empty) -> [B, L] (0 for empty slots)."""
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    live = slot_phys >= 0
    phys = slot_phys.long().clamp_min(0)
    dt = torch.promote_types(kmin.dtype, torch.float32)  # bf16 bounds would misrank pages
    qg = q.reshape(B, Hkv, Hq // Hkv, D).to(dt)
    bound = _quest_bound(qg, kmin[phys].to(dt), kmax[phys].to(dt))  # [B, Hkv, G, L]
    bound = bound * (D ** -0.5 if sm_scale is None else sm_scale)
    bound = bound.masked_fill(~live[:, None, None, :], float("-inf"))
    p = torch.softmax(bound, -1).nan_to_num(0.0)
    return p.mean((1, 2))


def rank_order(score: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Permutation of the last dim by (score desc, key asc): two stable sorts."""
    by_key = torch.sort(key, dim=-1, stable=True).indices
    by_score = torch.sort(score.gather(-1, by_key), dim=-1, descending=True, stable=True).indices
    return by_key.gather(-1, by_score)


# ---------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------
class MilestoneDecoder:
    """One layer's RaaS decode over a paged KVCache: prefill, then one `step` per token.

    `scorer(q, kmin, kmax, slot_phys) -> [B, L]` defaults to torch_page_scores (the Triton
    MilestoneScoreTriton has the same signature); `attend` follows decode_api, called with
    keywords as in decode_step (None: the torch reference). After each step
    `last_evictions` lists the (b, logical page) evicted and `last_selection` holds
    (indices, counts).

    Prefill takes each sequence's budget_pages decode pages from the cache once; decode slot
    s of sequence b always holds page `slot_pages[b][s]`, so an eviction hands the victim's
    page to the page that opens, and the cache never holds more than prefill + budget pages.

    Two device paths, same results: the general one (torch ops: victims picked with a sync,
    pages mapped on the host, scores, two stable sorts to rank, a sort-and-dedupe selection;
    any scorer, CPU included), and the fast one (`fast`, the default when the scorer offers
    `bounds`, i.e. MilestoneScoreTriton). The fast path opens pages on the device
    (MilestoneOpenTriton: victim, block table, slot, refresh count, selection row), appends
    and folds the key into its page's min/max in one launch, then runs the bounds kernel and
    one launch of MilestoneSelectTriton (scores, ranking, timestamps and, non-hybrid, the
    selection). It reads nothing from the host during a step: any run of its steps can be
    captured in one CUDA graph, and `replayed(cache, steps)` advances the host's record
    after a later replay (what the host keeps is what it can know without a sync: token
    counts, live pages per sequence, the number of evictions; which pages were evicted is
    read from the device when asked for).
    """

    def __init__(self, rule: MilestoneRule, num_q_heads: int, num_kv_heads: int,
                 head_dim: int, scorer=None, compute_dtype=torch.float32, fast=None,
                 selector=None, selector_config: dict | None = None):
        self.rule = rule
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.scorer = scorer or torch_page_scores
        self.compute_dtype = compute_dtype
        has_bounds = callable(getattr(self.scorer, "bounds", None))
        self.fast = has_bounds if fast is None else bool(fast)
        if self.fast and not has_bounds:
            raise ValueError("the fast path needs a scorer with `bounds` "
                             "(MilestoneScoreTriton)")
        self._opener = None
        if self.fast:
            from ..codegen.milestone_kernels import MilestoneSelectStatic, MilestoneSelectTriton
            from ..codegen.milestone_open import MilestoneOpenStatic, MilestoneOpenTriton

            build_dir = getattr(self.scorer, "build_dir", None)
            if selector is None:
                selector = MilestoneSelectTriton(MilestoneSelectStatic.from_rule(rule),
                                                 selector_config, build_dir=build_dir)
            self._opener = MilestoneOpenTriton(MilestoneOpenStatic.from_rule(rule),
                                               build_dir=build_dir)
        self.selector = selector
        self._minmax = None  # the fast path's append + page min/max kernel (built on first use)
        self._pending = None  # (indices, counts) the fast _refresh already wrote
        self.t = 0
        self._evictions_host: list[tuple[int, int]] = []  # the general path's last step
        self._evicted = None  # the fast path's: [B] logical page evicted (-1 none)
        self.num_evictions = 0
        self.last_selection = None

    @classmethod
    def from_spec(cls, spec, **kw) -> "MilestoneDecoder":
        m = spec.model
        return cls(MilestoneRule.from_spec(spec), m.num_q_heads, m.num_kv_heads, m.head_dim, **kw)

    # --- state -------------------------------------------------------------------------
    def prefill(self, cache, k: torch.Tensor, v: torch.Tensor, lengths=None) -> None:
        """Append prompts k, v [B, T, Hkv, D] (sequence b keeps its first lengths[b] tokens),
        build each prefill page's min/max and take the decode pages."""
        r = self.rule
        if cache.block_table is None or cache.page_size != r.page_size:
            raise ValueError(f"the milestone rule needs a paged cache with page_size "
                             f"{r.page_size}")
        if cache.pages_on_device:
            raise ValueError("this cache was prefilled already (a decoder took its pages): "
                             "prefill a fresh cache")
        B, dev = cache.batch, cache.device
        lengths = cache.prefill_lengths(k, v, lengths)
        L = r.budget_pages
        self.prefill_pages = [math.ceil(n / r.page_size) for n in lengths]
        # decode pages per sequence: the budget, or fewer where the cache's capacity ends
        # the decode before the budget fills
        width = cache.block_table.shape[1]
        decode_pages = [min(L, width - n) for n in self.prefill_pages]
        need = sum(self.prefill_pages) + sum(decode_pages)
        if need > len(cache.free_pages):
            raise CacheFullError(f"the prefill and the decode budget need {need} pages "
                                 f"({sum(self.prefill_pages)} + {sum(decode_pages)}) and "
                                 f"{len(cache.free_pages)} are free: raise num_pages")
        self.kmin = torch.zeros(cache.k.shape[0], cache.kv_heads, cache.head_dim,
                                dtype=cache.k.dtype, device=dev)
        self.kmax = torch.zeros_like(self.kmin)
        self.prefill_len = lengths
        self.slot_logical = torch.full((B, L), -1, dtype=torch.long, device=dev)
        self.slot_phys = torch.full((B, L), -1, dtype=torch.int32, device=dev)
        self.slot_ts = torch.full((B, L), -1, dtype=torch.long, device=dev)
        self._live = [0] * B  # live decode pages per sequence (slots 0 .. live-1)
        # ceil(refresh_fraction * live) for live = 0 .. L, on the host and for the device
        self._refresh_counts = [math.ceil(r.refresh_fraction * c) if r.refresh_fraction
                                is not None else 0 for c in range(L + 1)]
        self._refresh_k = torch.zeros(B, dtype=torch.long, device=dev)  # pages refreshed
        self._refresh_k_table = torch.tensor(self._refresh_counts, device=dev)
        self._prefill_pages_t = torch.tensor(self.prefill_pages, device=dev)
        self._evicted = torch.full((B,), -1, dtype=torch.long, device=dev)
        self._evictions_host = []
        bpp = r.blocks_per_page
        # the fast path's selection row per sequence: prefill blocks, then the live decode
        # pages' blocks, ascending, -1 padded (the opening kernel keeps the decode part)
        self._block_width = max(1, (max(self.prefill_pages, default=0) + L) * bpp)
        self._blocks = torch.tensor(
            [list(range(n * bpp)) + [-1] * (self._block_width - n * bpp)
             for n in self.prefill_pages], dtype=torch.int32, device=dev).reshape(
                 B, self._block_width)
        # the general path's upload per step: [t, current page of each sequence (B), fresh
        # page (B), opened pages (b, slot, logical, physical: 4 B), refresh_k (B)]
        self._step_buf = torch.zeros(1 + 7 * B, dtype=torch.long, device=dev)
        self._t_dev = self._step_buf[:1]  # the step number the refresh stamps, on device
        # the fast path's page scores of the last refresh (what it ranked by)
        self.last_scores = torch.zeros(B, L, dtype=torch.float32, device=dev)
        self._pending = None
        self.t = 0
        for b, n in enumerate(lengths):
            cache.extend(b, k[b, :n], v[b, :n])
            if n:
                lo, hi = page_minmax(k[b], n, r.page_size)
                phys = cache.block_table[b, : self.prefill_pages[b]].long()
                self.kmin[phys] = lo.to(self.kmin.dtype)
                self.kmax[phys] = hi.to(self.kmax.dtype)
        self.slot_pages = [cache.take_pages(n) + [-1] * (L - n) for n in decode_pages]
        self._slot_pages_t = torch.tensor(self.slot_pages, dtype=torch.int32,
                                          device=dev).reshape(B, L)
        if self.fast:
            cache.map_pages_on_device()
        self._prefill_blocks = self._all_prefill_blocks(dev)

    def _all_prefill_blocks(self, dev) -> torch.Tensor:
        """[B, Hkv, W] every block of the prefill pages (-1 padded)."""
        bpp = self.rule.blocks_per_page
        W = max(1, max(self.prefill_pages) * bpp)
        j = torch.arange(W, device=dev)
        n = torch.tensor(self.prefill_pages, device=dev)[:, None] * bpp
        out = torch.where(j[None, :] < n, j[None, :], torch.full_like(j[None, :], -1))
        return out[:, None, :].expand(-1, self.num_kv_heads, -1)

    def decode_pages(self, b: int) -> list[int]:
        """Logical pages of sequence b's live decode pages, ascending (read from the device)."""
        return sorted(p for p in self.slot_logical[b].tolist() if p >= 0)

    def timestamps(self, b: int) -> dict[int, int]:
        pages, ts = self.slot_logical[b].tolist(), self.slot_ts[b].tolist()
        return {p: t for p, t in zip(pages, ts) if p >= 0}

    @property
    def last_evictions(self) -> list[tuple[int, int]]:
        """(b, logical page) of each page the last step evicted (the fast path's are read
        from the device: after a replayed graph, its last step's)."""
        if self.fast and self._evicted is not None:
            return [(b, p) for b, p in enumerate(self._evicted.tolist()) if p >= 0]
        return list(self._evictions_host)

    # --- one step ----------------------------------------------------------------------
    def _note_openings(self, lengths) -> list[tuple[int, bool]]:
        """The sequences whose next token (at lengths[b]) opens a page, each with whether its
        budget is full (it evicts); counted into the live pages and num_evictions. They
        follow from the lengths alone, so the host keeps them without asking the device."""
        L, P = self.rule.budget_pages, self.rule.page_size
        out = []
        for b, n in enumerate(lengths):
            if n % P == 0:
                full = self._live[b] == L
                self.num_evictions += full
                self._live[b] += not full
                out.append((b, full))
        return out

    def _open_pages(self, cache) -> None:
        """The general path, before the append: give every sequence whose next token opens
        a page its slot and that slot's page, evicting its oldest decode page (smallest
        timestamp, then logical page) when the budget is full (one sync)."""
        P = self.rule.page_size
        opening = self._note_openings(cache.lengths)
        self._evictions_host, self._opening = [], []
        full = [b for b, f in opening if f]
        victims = {}
        if full:
            key = torch.where(self.slot_logical >= 0, self.slot_ts * _BIG + self.slot_logical,
                              torch.full_like(self.slot_ts, torch.iinfo(torch.long).max))
            rows = torch.tensor(full, device=key.device)
            slot = key[rows].argmin(-1)
            for b, s, logical in zip(full, *torch.stack(
                    [slot, self.slot_logical[rows, slot]]).tolist()):
                cache.unmap_page(b, logical)
                self._evictions_host.append((b, logical))
                victims[b] = s
        for b, f in opening:
            s = victims[b] if f else self._live[b] - 1  # slots fill in order, never empty
            cache.map_page(b, cache.lengths[b] // P, self.slot_pages[b][s])
            self._opening.append((b, s))

    def _open_on_device(self, cache) -> None:
        """The fast path, before the append: the same opening in one launch, decided on the
        device (the host only counts, _note_openings)."""
        self._note_openings(cache.lengths)
        self._opener(cache.seq_lens, cache.block_table, self.slot_logical, self.slot_ts,
                     self.slot_phys, self._slot_pages_t, self._refresh_k,
                     self._refresh_k_table, self._prefill_pages_t,
                     None if self.rule.hybrid else self._blocks, self._evicted, self._t_dev,
                     self.rule.page_size)

    def _upload(self, values: list[int]) -> torch.Tensor:
        """values -> the head of the persistent step buffer, one host-to-device copy (from
        pinned memory on CUDA: no sync)."""
        host = torch.tensor(values, dtype=torch.long)
        out = self._step_buf[: len(values)]
        if out.is_cuda:
            out.copy_(host.pin_memory(), non_blocking=True)
        else:
            out.copy_(host)
        return out

    def _after_append(self, cache, k_new) -> None:
        """The general path, after the append: record the opened pages in their slots and
        update the min/max of each token's page (one upload)."""
        P, B = self.rule.page_size, cache.batch
        cur = [cache.physical_page(b, (n - 1) // P) for b, n in enumerate(cache.lengths)]
        first = [int((n - 1) % P == 0) for n in cache.lengths]
        vals = [self.t] + cur + first
        n = len(self._opening)
        if n:
            bs_ = [b for b, _ in self._opening]
            slots = [s for _, s in self._opening]
            vals += bs_ + slots + [(cache.lengths[b] - 1) // P for b in bs_]
            vals += [self.slot_pages[b][s] for b, s in self._opening]
            vals += [self._refresh_counts[c] for c in self._live]
        buf = self._upload(vals)
        pages, fresh = buf[1: 1 + B], buf[1 + B: 1 + 2 * B]
        if n:
            o = 1 + 2 * B
            bi, si = buf[o: o + n], buf[o + n: o + 2 * n]
            self.slot_logical[bi, si] = buf[o + 2 * n: o + 3 * n]
            self.slot_phys[bi, si] = buf[o + 3 * n: o + 4 * n].to(torch.int32)
            self.slot_ts[bi, si] = self.t
            self._refresh_k.copy_(buf[o + 4 * n: o + 4 * n + B])
        kn = k_new.to(self.kmin.dtype)
        fresh = (fresh != 0)[:, None, None]
        self.kmin[pages] = torch.where(fresh, kn, torch.minimum(self.kmin[pages], kn))
        self.kmax[pages] = torch.where(fresh, kn, torch.maximum(self.kmax[pages], kn))

    def _append(self, cache, k_new, v_new) -> None:
        """Append the token's k/v; the fast path folds the key into its page's min/max in
        the same launch (the KV append kernel with Quest metadata of one block per page:
        kmin / kmax [pages, Hkv, D] seen as [pages, 1, Hkv, D]; it finds the page, and
        whether the token opens it, on the device)."""
        if not self.fast:
            cache.append(k_new, v_new)
            return
        bounds = {"kmin": self.kmin.unsqueeze(1), "kmax": self.kmax.unsqueeze(1)}
        cache.append(k_new, v_new, meta=bounds, kernel=self._minmax_kernel(cache))

    def _minmax_kernel(self, cache):
        """The KV append that also folds each key into its page's min/max (block = page),
        reset where the token opens the page (pos % page_size == 0)."""
        if self._minmax is None:
            from ..codegen.kv_append import AppendStatic, TritonKVAppend
            from ..codegen.triton_kernel import dtype_name

            P, dt = self.rule.page_size, dtype_name(cache.k.dtype)
            static = AppendStatic(self.head_dim, self.num_kv_heads, dt, dt, "paged", P,
                                  "upper_bound", P)
            self._minmax = TritonKVAppend(static, build_dir=getattr(self.scorer, "build_dir",
                                                                    None))
        return self._minmax

    def _refresh(self, q, cache) -> None:
        """Device work only (no host tensors): CUDA-graph capturable with `select`."""
        r = self.rule
        if self.fast:  # bounds, then one launch: scores, ranking, timestamps (+ selection)
            bounds = self.scorer.bounds(q, self.kmin, self.kmax, self.slot_phys)
            self._pending = self.selector.refresh(
                bounds, self.slot_logical, self.slot_ts, self._refresh_k, cache.seq_lens,
                self._t_dev, r.page_size, threshold=r.refresh_threshold,
                blocks=None if r.hybrid else self._blocks, kv_heads=self.num_kv_heads,
                block_size=r.block_size, scores=self.last_scores)
            return
        live = self.slot_logical >= 0
        score = self.scorer(q, self.kmin, self.kmax, self.slot_phys)
        if r.refresh_threshold is not None:
            hit = live & (score > r.refresh_threshold)
        else:
            ranked = score.masked_fill(~live, float("-inf"))
            order = rank_order(ranked, torch.where(live, self.slot_logical,
                                                   torch.full_like(self.slot_logical, _BIG)))
            take = (torch.arange(order.shape[-1], device=score.device)[None, :]
                    < self._refresh_k[:, None])
            hit = torch.zeros_like(live).scatter(-1, order, take) & live
        cur = (cache.seq_lens.long() - 1) // r.page_size  # the page of the current token
        hit |= live & (self.slot_logical == cur[:, None])
        torch.where(hit, self._t_dev, self.slot_ts, out=self.slot_ts)  # t: read on device

    def _hybrid_prefill_blocks(self, q, block_table) -> torch.Tensor:
        """[B, Hkv, kept * blocks_per_page]: blocks of the top prefill pages per KV head."""
        r = self.rule
        B, Hq, D = q.shape
        Hkv, dev = self.num_kv_heads, q.device
        npp = max(self.prefill_pages)
        if npp == 0:
            return torch.full((B, Hkv, 1), -1, dtype=torch.long, device=dev)
        tbl = block_table[:, :npp]
        exists = torch.arange(npp, device=dev)[None, :] < self._prefill_pages_t[:, None]
        phys = tbl.long().clamp_min(0)
        dt = torch.promote_types(self.kmin.dtype, torch.float32)
        qg = q.reshape(B, Hkv, Hq // Hkv, D).to(dt)
        score = _quest_bound(qg, self.kmin[phys].to(dt), self.kmax[phys].to(dt)).sum(2)
        score = score.masked_fill(~exists[:, None, :], float("-inf"))
        page = torch.arange(npp, device=dev).expand(B, Hkv, npp)
        keep = min(r.prefill_pages_kept, npp)
        top = rank_order(score, page)[..., :keep]
        top = torch.where(exists[:, None, :].expand(B, Hkv, npp).gather(-1, top), top,
                          torch.full_like(top, -1))
        bpp = r.blocks_per_page
        blocks = top[..., None] * bpp + torch.arange(bpp, device=dev)
        return torch.where(top[..., None] >= 0, blocks, -1).reshape(B, Hkv, keep * bpp)

    def select(self, q, cache):
        """Selected blocks [B, Hkv, W] int32 ascending (-1 padded) and counts [B, Hkv]."""
        r = self.rule
        if self._pending is not None:  # written by the fast _refresh of this step
            out, self._pending = self._pending, None
            return out
        if self.fast and not r.hybrid:
            return self.selector.select(self._blocks, cache.seq_lens, self.num_kv_heads,
                                        r.block_size)
        B, dev = cache.batch, q.device
        Hkv, bpp = self.num_kv_heads, r.blocks_per_page
        nb = (cache.seq_lens.long() + r.block_size - 1) // r.block_size  # [B]
        parts = [self._hybrid_prefill_blocks(q, cache.block_table) if r.hybrid
                 else self._prefill_blocks]
        dec = self.slot_logical[..., None] * bpp + torch.arange(bpp, device=dev)
        dec = torch.where(self.slot_logical[..., None] >= 0, dec, -1).reshape(B, 1, -1)
        parts.append(dec.expand(B, Hkv, -1))
        if r.hybrid:  # always-on blocks, where their page is still held
            j = torch.arange(max(1, r.sink_blocks + r.local_blocks), device=dev)
            tail = nb[:, None] - r.local_blocks + (j - r.sink_blocks)
            forced = torch.where(j[None, :] < r.sink_blocks, j[None, :], tail)
            page = forced // bpp
            held = (page < self._prefill_pages_t[:, None]) | (
                (self.slot_logical[:, None, :] == page[..., None]).any(-1))
            forced = torch.where(held & (forced >= 0), forced, -1)
            parts.append(forced[:, None, :].expand(B, Hkv, -1))
        blocks = torch.cat(parts, -1)
        blocks = torch.where((blocks >= 0) & (blocks < nb[:, None, None]), blocks, _BIG)
        blocks = blocks.sort(-1).values
        dup = torch.zeros_like(blocks, dtype=torch.bool)
        dup[..., 1:] = blocks[..., 1:] == blocks[..., :-1]
        blocks = torch.where(dup, _BIG, blocks).sort(-1).values
        counts = (blocks < _BIG).sum(-1).to(torch.int32)
        idx = torch.where(blocks < _BIG, blocks, -1).to(torch.int32)
        return idx, counts

    def capturable(self, cache, steps: int = 1) -> bool:
        """Whether the next `steps` decode steps are device work only, so that one CUDA graph
        can hold them: on the fast path any steps are (the general path uploads host values
        every step). Reserve them first (`cache.reserve(steps)`: a capacity check here)."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, not {steps!r}")
        return self.fast

    def replayed(self, cache, steps: int) -> None:
        """After a CUDA graph of `steps` captured decode steps was replayed: bring the host's
        record (token counts, step number, live pages, evictions counted) to where the
        replay took the device. (Capturing advanced the host by `steps` and the device by
        none, so the replay right after the capture needs no call; every later replay of the
        same graph does.)"""
        if not self.capturable(cache, steps):
            raise ValueError("the general path's steps cannot be captured, so no graph held "
                             "them: decode on the fast path (a MilestoneScoreTriton scorer)")
        before = list(cache.lengths)
        cache.replayed(steps)  # raises, changing nothing, where the steps do not fit
        for i in range(steps):
            self._note_openings([n + i for n in before])
        self.t += steps

    def step(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache,
             attend=None) -> torch.Tensor:
        """Open a page (evicting) where the token opens one, append the token's k/v
        [B, Hkv, D], refresh, attend."""
        if capturing(q) and not self.fast:
            raise RuntimeError(
                "this milestone step cannot be captured into a CUDA graph: the general path "
                "uploads host values every step; decode on the fast path (a "
                "MilestoneScoreTriton scorer), whose steps are device work only")
        cache.check_capacity(1)  # before the opening writes the block table
        self.t += 1
        if self.fast:
            self._open_on_device(cache)
            self._append(cache, k_new, v_new)
        else:
            self._open_pages(cache)
            self._append(cache, k_new, v_new)
            self._after_append(cache, k_new)
        self._refresh(q, cache)
        idx, counts = self.select(q, cache)
        self.last_selection = (idx, counts)
        if attend is None:
            out = sparse_decode_reference(q, cache.k, cache.v, idx, counts, cache.seq_lens,
                                          self.rule.block_size, block_table=cache.block_table,
                                          compute_dtype=self.compute_dtype, validate=False)
            return out.to(q.dtype)
        return attend(q, block_indices=idx, block_counts=counts, **cache.attention_args())
