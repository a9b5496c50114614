"""Triton kernels of the milestone rule (RaaS), rendered from templates/triton/:

- milestone_score.py.j2 (MilestoneScoreTriton): the Quest bound of every query head against
  every decode slot's page, [B, Hq, L], one small program per (slot chunk, KV head,
  sequence). Called as a scorer (same signature as
  sparsegen.methods.milestone.torch_page_scores) it returns the page scores [B, L].
- milestone_select.py.j2 (MilestoneSelectTriton): one program per sequence turns those
  bounds into page scores (softmax over slots per head, mean over heads), ranks the live
  slots, updates their timestamps and writes the non-hybrid selection (block indices and
  counts for every KV head) in the same launch.

MilestoneDecoder takes the fast path (bounds + one refresh/select launch) when its scorer
offers `bounds`. Attention itself is the sparse decode kernel over the kept pages
(decode_api; sparsegen.codegen.backend.decode_backend).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .triton_decode import LOG2E
from .triton_kernel import (TRITON_PTR, TritonKernel, cdiv, check_int_config, next_pow2, pow2,
                            torch_dtype)


@dataclass(frozen=True)
class MilestoneStatic:
    head_dim: int
    group_size: int
    dtype: str = "bf16"  # of q and the page min/max

    @classmethod
    def from_spec(cls, spec, dtype: str | None = None) -> "MilestoneStatic":
        return cls(spec.model.head_dim, spec.model.group_size, dtype or spec.model.dtype)

    def as_dict(self) -> dict:
        return asdict(self)


class MilestoneScoreTriton(TritonKernel):
    name = "milestone_score"
    template = "triton/milestone_score.py.j2"

    @classmethod
    def tunable_space(cls, static) -> dict[str, list]:
        return {"slot_chunk": [8, 16, 32, 64], "num_warps": [1, 2, 4, 8]}

    @classmethod
    def default_config(cls, static) -> dict:
        # B 8 x Hkv 8 x 128 slots: 256 programs of 32 slots, 32 fp32 values per thread
        return {"slot_chunk": 32, "num_warps": 4}

    @classmethod
    def check_config(cls, static, config) -> str | None:
        bad = check_int_config(config, ("slot_chunk", "num_warps"))
        if bad:
            return bad
        if not pow2(config["slot_chunk"]) or not 8 <= config["slot_chunk"] <= 256:
            return f"slot_chunk={config['slot_chunk']} must be a power of two in [8, 256]"
        per_thread = config["slot_chunk"] * static.head_dim // (32 * config["num_warps"])
        if per_thread > 64:  # two such tiles (min, max) live at once
            return "min/max tiles over 64 fp32 values per thread (register spills)"
        if per_thread < 1:
            return "slot_chunk x head_dim leaves threads idle"
        return None

    def template_params(self) -> dict:
        s = self.static
        return {"head_dim": s.head_dim, "group_size": s.group_size, "dtype": s.dtype,
                **self.config}

    def signatures(self):
        dt = TRITON_PTR[self.static.dtype]
        sig = {"Q": dt, "KMIN": dt, "KMAX": dt, "SLOT": "*i32", "OUT": "*fp32",
               "qk_scale": "fp32", "L": "i32",
               **{a: "i32" for a in ("stride_qb", "stride_qh", "stride_mp", "stride_mh",
                                     "stride_sb", "stride_ob", "stride_oh")}}
        return [("milestone_bounds", sig, ("Q", "KMIN", "KMAX", "SLOT", "OUT", "stride_qb",
                                           "stride_qh", "stride_mp", "stride_mh"),
                 {"num_warps": self.config["num_warps"], "num_stages": 1})]

    def bounds(self, q, kmin, kmax, slot_phys, sm_scale=None, out=None):
        """q [B, Hq, D]; kmin/kmax [pages, Hkv, D]; slot_phys [B, L] int32 (-1 empty) ->
        [B, Hq, L] fp32 bounds * sm_scale * log2(e) (-inf for empty slots). No sync."""
        s = self.static
        B, Hq, D = q.shape
        Hkv = kmin.shape[1]
        if D != s.head_dim or Hq != Hkv * s.group_size:
            raise ValueError(f"q {tuple(q.shape)} / kmin {tuple(kmin.shape)} do not match "
                             f"head_dim={s.head_dim}, group_size={s.group_size}")
        if q.dtype != torch_dtype(s.dtype) or kmin.dtype != q.dtype or kmax.dtype != q.dtype:
            raise TypeError(f"q, kmin and kmax must be {s.dtype}")
        if slot_phys.dtype != torch.int32 or kmin.stride() != kmax.stride():
            raise TypeError("slot_phys must be int32; kmin and kmax must share strides")
        if q.stride(2) != 1 or kmin.stride(2) != 1 or slot_phys.stride(1) != 1:
            raise ValueError("q, kmin/kmax and slot_phys need a contiguous last dim")
        L = slot_phys.shape[1]
        if out is None:
            out = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
        scale = (D ** -0.5 if sm_scale is None else sm_scale) * LOG2E
        chunk = self.config["slot_chunk"]
        self.module.milestone_bounds[(cdiv(L, chunk), Hkv, B)](
            q, kmin, kmax, slot_phys, out, scale, L,
            q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), slot_phys.stride(0),
            out.stride(0), out.stride(1),
            num_warps=self.config["num_warps"], num_stages=1)
        return out

    def __call__(self, q, kmin, kmax, slot_phys, sm_scale=None):
        """Page scores [B, L] fp32 (0 for empty slots), as torch_page_scores. No sync."""
        L = slot_phys.shape[1]
        sel = getattr(self, "_score_kernels", {}).get(L)
        if sel is None:
            sel = MilestoneSelectTriton(MilestoneSelectStatic(L), build_dir=self.build_dir)
            self._score_kernels = {**getattr(self, "_score_kernels", {}), L: sel}
        return sel.scores(self.bounds(q, kmin, kmax, slot_phys, sm_scale))

    # --- tuner protocol --------------------------------------------------------------------
    @classmethod
    def bench_inputs(cls, static: MilestoneStatic, batch: int, seq_len: int, kv_heads: int = 8,
                     budget_blocks: int = 128, device="cuda", seed: int = 0) -> dict:
        """Page min/max of a pool of prefill + decode pages and every sequence's decode
        slots full (the steady state: budget reached, evicting). The slots per sequence are
        the rule's budget pages, taken as budget_blocks (pages of one block: RaaS's 16)."""
        gen = torch.Generator(device=device).manual_seed(seed)
        L = max(1, budget_blocks)
        pages = batch * (L + 8)
        dt = torch_dtype(static.dtype)
        x = torch.randn(pages, kv_heads, static.head_dim, generator=gen, device=device).to(dt)
        y = torch.randn(pages, kv_heads, static.head_dim, generator=gen, device=device).to(dt)
        slot_phys = torch.randperm(pages, generator=gen, device=device)[:batch * L]
        return {"q": torch.randn(batch, kv_heads * static.group_size, static.head_dim,
                                 generator=gen, device=device).to(dt),
                "kmin": torch.minimum(x, y), "kmax": torch.maximum(x, y),
                "slot_phys": slot_phys.view(batch, L).to(torch.int32)}

    def reference(self, q, kmin, kmax, slot_phys, sm_scale=None):
        from ..methods.milestone import torch_page_scores
        return torch_page_scores(q, kmin, kmax, slot_phys, sm_scale)


@dataclass(frozen=True)
class MilestoneSelectStatic:
    slots: int                    # decode slots per sequence (the rule's budget_pages)
    threshold_mode: bool = False  # refresh by score > threshold instead of the top fraction

    @classmethod
    def from_rule(cls, rule) -> "MilestoneSelectStatic":
        return cls(rule.budget_pages, rule.refresh_threshold is not None)

    @classmethod
    def from_spec(cls, spec) -> "MilestoneSelectStatic":
        from ..methods.milestone import MilestoneRule
        return cls.from_rule(MilestoneRule.from_spec(spec))

    def as_dict(self) -> dict:
        return asdict(self)


class MilestoneSelectTriton(TritonKernel):
    """Per-sequence refresh (+ selection) of the milestone rule; see the template."""

    name = "milestone_select"
    template = "triton/milestone_select.py.j2"

    @classmethod
    def tunable_space(cls, static) -> dict[str, list]:
        return {"head_chunk": [4, 8, 16, 32], "block_chunk": [64, 128, 256, 512],
                "rank_sort": [0, 1], "num_warps": [1, 2, 4, 8]}

    @classmethod
    def default_config(cls, static) -> dict:
        lp = next_pow2(static.slots)
        # sm_90 SASS at 128 slots: the bitonic tl.sort (one key a thread, shuffles) came out
        # shorter than the [L, L] comparison (keys broadcast through shared memory, ~190
        # registers); 8 warps: 16 bounds a thread, one pass over the heads
        return {"head_chunk": max(1, min(32, 4096 // lp)), "block_chunk": 256,
                "rank_sort": 1, "num_warps": 8}

    @classmethod
    def check_config(cls, static, config) -> str | None:
        bad = check_int_config(config, ("head_chunk", "block_chunk", "rank_sort", "num_warps"))
        if bad:
            return bad
        if config["rank_sort"] not in (0, 1):
            return "rank_sort must be 0 or 1"
        if not config["rank_sort"] and next_pow2(static.slots) ** 2 > 1024 * 32 * config[
                "num_warps"]:
            return "the [L, L] rank comparison is over 1024 values per thread: use rank_sort"
        if not pow2(config["head_chunk"]) or not pow2(config["block_chunk"]):
            return "head_chunk and block_chunk must be powers of two"
        if config["head_chunk"] * next_pow2(static.slots) > 32 * 32 * config["num_warps"]:
            return "bounds tile over 32 fp32 values per thread (register spills)"
        if config["block_chunk"] < 16:
            return "block_chunk must be >= 16"
        return None

    def template_params(self) -> dict:
        return {"slots_pad": next_pow2(self.static.slots),
                "threshold_mode": bool(self.static.threshold_mode), **self.config}

    def signatures(self):
        kw = {"num_warps": self.config["num_warps"], "num_stages": 1}
        i32 = lambda *names: {n: "i32" for n in names}  # noqa: E731
        refresh = {"BOUNDS": "*fp32", "LOGICAL": "*i64", "TS": "*i64", "REFK": "*i64",
                   "SEQ": "*i32", "TNOW": "*i64", "SCORES": "*fp32"}
        select = {"BLOCKS": "*i32", "SEQ": "*i32", "IDX": "*i32", "COUNTS": "*i32"}
        return [
            ("milestone_refresh_select",
             {**refresh, **{k: v for k, v in select.items() if k != "SEQ"},
              "threshold": "fp32", **i32("L", "Hq", "Hkv", "W", "page_size", "block_size",
                                         "stride_bb", "stride_bh", "stride_lb", "stride_tb",
                                         "stride_sb", "stride_kb", "stride_ib", "stride_ih",
                                         "stride_cb")},
             ("BOUNDS", "LOGICAL", "TS", "BLOCKS", "IDX"), kw),
            ("milestone_refresh",
             {**refresh, "threshold": "fp32",
              **i32("L", "Hq", "page_size", "stride_bb", "stride_bh", "stride_lb",
                    "stride_tb", "stride_sb")},
             ("BOUNDS", "LOGICAL", "TS"), kw),
            ("milestone_select",
             {**select, **i32("W", "Hkv", "block_size", "stride_kb", "stride_ib",
                              "stride_ih", "stride_cb")},
             ("BLOCKS", "IDX"), kw),
            ("milestone_scores",
             {"BOUNDS": "*fp32", "OUT": "*fp32",
              **i32("L", "Hq", "stride_bb", "stride_bh", "stride_ob")},
             ("BOUNDS", "OUT"), kw),
        ]

    def _launch(self, name, B, *args):
        getattr(self.module, name)[(B,)](*args, num_warps=self.config["num_warps"],
                                          num_stages=1)

    def _check_bounds(self, bounds):
        if bounds.dtype != torch.float32 or bounds.stride(2) != 1:
            raise TypeError("bounds must be fp32 [B, Hq, L] with a contiguous last dim")
        if bounds.shape[2] > self.static.slots:
            raise ValueError(f"{bounds.shape[2]} slots > the kernel's {self.static.slots}")

    def scores(self, bounds):
        """bounds [B, Hq, L] (MilestoneScoreTriton.bounds) -> page scores [B, L] fp32."""
        self._check_bounds(bounds)
        B, Hq, L = bounds.shape
        out = torch.empty(B, L, dtype=torch.float32, device=bounds.device)
        self._launch("milestone_scores", B, bounds, out, L, Hq, bounds.stride(0),
                     bounds.stride(1), out.stride(0))
        return out

    def refresh(self, bounds, slot_logical, slot_ts, refresh_k, seq_lens, t_now, page_size,
                threshold=None, blocks=None, kv_heads=None, block_size=None, scores=None):
        """Refresh the timestamps slot_ts [B, L] int64 in place: the hit slots and the slot
        of the current token's page get t_now[0]. slot_logical [B, L] int64 (-1 empty),
        refresh_k [B] int64 (top-fraction mode), seq_lens [B] int32 (after the append);
        the page scores go to `scores` [B, L] fp32 (allocated when None). With blocks
        ([B, W] int32, ascending, -1 padded) also selects in the same launch and returns
        (indices [B, kv_heads, W] int32, counts [B, kv_heads] int32); else None."""
        self._check_bounds(bounds)
        B, Hq, L = bounds.shape
        if scores is None:
            scores = torch.empty(B, L, dtype=torch.float32, device=bounds.device)
        for name, x, dt in (("slot_logical", slot_logical, torch.int64),
                            ("slot_ts", slot_ts, torch.int64),
                            ("refresh_k", refresh_k, torch.int64),
                            ("seq_lens", seq_lens, torch.int32), ("t_now", t_now, torch.int64),
                            ("scores", scores, torch.float32)):
            if x.dtype != dt or x.stride(-1) != 1:
                raise TypeError(f"{name} must be {dt} with a contiguous last dim")
        if self.static.threshold_mode != (threshold is not None):
            raise ValueError("threshold must be given exactly in threshold mode")
        thr = 0.0 if threshold is None else float(threshold)
        head = (bounds, slot_logical, slot_ts, refresh_k, seq_lens, t_now, scores)
        if blocks is None:
            self._launch("milestone_refresh", B, *head, thr, L, Hq, page_size,
                         bounds.stride(0), bounds.stride(1), slot_logical.stride(0),
                         slot_ts.stride(0), scores.stride(0))
            return None
        idx, counts, W = self._select_outputs(blocks, kv_heads)
        self._launch("milestone_refresh_select", B, *head, blocks, idx, counts, thr, L, Hq,
                     kv_heads, W, page_size, block_size, bounds.stride(0), bounds.stride(1),
                     slot_logical.stride(0), slot_ts.stride(0), scores.stride(0),
                     blocks.stride(0), idx.stride(0), idx.stride(1), counts.stride(0))
        return idx, counts

    def _select_outputs(self, blocks, kv_heads):
        if blocks.dtype != torch.int32 or blocks.stride(1) != 1:
            raise TypeError("blocks must be int32 [B, W] with a contiguous last dim")
        B, W = blocks.shape
        idx = torch.empty(B, kv_heads, W, dtype=torch.int32, device=blocks.device)
        counts = torch.empty(B, kv_heads, dtype=torch.int32, device=blocks.device)
        return idx, counts, W

    # --- tuner protocol --------------------------------------------------------------------
    def __call__(self, bounds, slot_logical, slot_ts, refresh_k, seq_lens, t_now, page_size,
                 threshold=None, blocks=None, kv_heads=None, block_size=None, scores=None):
        """One step's refresh (+ selection with blocks) as the decoder's fast path runs it:
        refresh's arguments -> (scores [B, L], slot_ts [B, L] refreshed in place) plus the
        selection (indices, counts) when blocks are given. Repeating a call is idempotent
        (the hit slots get t_now again)."""
        if scores is None:
            scores = torch.empty(bounds.shape[0], bounds.shape[2], dtype=torch.float32,
                                 device=bounds.device)
        sel = self.refresh(bounds, slot_logical, slot_ts, refresh_k, seq_lens, t_now,
                           page_size, threshold, blocks, kv_heads, block_size, scores)
        return (scores, slot_ts) + (tuple(sel) if sel is not None else ())

    @classmethod
    def bench_inputs(cls, static: MilestoneSelectStatic, batch: int, seq_len: int,
                     kv_heads: int = 8, q_heads: int | None = None, page_size: int = 16,
                     block_size: int = 16, device="cuda", seed: int = 0) -> dict:
        """A non-hybrid step at seq_len tokens: half prefill pages, the decode pages after
        them with min(slots, decode pages) live in random slots (the current page always),
        older timestamps, refresh_k = ceil(live / 2) (or a threshold between two score
        levels), the ascending block row. Bounds [B, Hq, L] (Hq = q_heads, default 4 per KV
        head) put each slot on its own level, half a log2 unit apart, with head noise of
        +-0.1: kernel and torch rank the pages alike (rounding ~1e-6 never reorders them)."""
        if page_size % block_size:
            raise ValueError(f"page_size={page_size} is not a multiple of "
                             f"block_size={block_size}")
        gen = torch.Generator(device=device).manual_seed(seed)
        B, L, P, bpp = batch, static.slots, page_size, page_size // block_size
        Hq = q_heads or 4 * kv_heads
        n_pages = max(2, -(-seq_len // P))
        n_pre = n_pages // 2
        live = min(L, n_pages - n_pre)
        logical = torch.full((B, L), -1, dtype=torch.long, device=device)
        for b in range(B):
            older = n_pre + torch.randperm(n_pages - 1 - n_pre, generator=gen,
                                           device=device)[:live - 1]
            pages = torch.cat([older, torch.tensor([n_pages - 1], device=device)])
            logical[b, torch.randperm(L, generator=gen, device=device)[:live]] = pages
        ok = logical >= 0
        # live slots take levels 0, 0.5, ... in random order (the threshold below needs them
        # consecutive), empty ones the top levels (their bounds are -inf anyway)
        draw = torch.rand(B, L, generator=gen, device=device).masked_fill(~ok, 2.0)
        level = draw.argsort(-1).argsort(-1).float() * 0.5
        noise = (torch.rand(B, Hq, L, generator=gen, device=device) - 0.5) * 0.2
        bounds = torch.where(ok[:, None, :], level[:, None, :] + noise, float("-inf"))
        t_now = 1 << 20
        ts = torch.randint(t_now - 4096, t_now, (B, L), generator=gen, device=device)
        threshold = None
        if static.threshold_mode:  # between the (live // 2)-th and next score levels
            s = torch.softmax(torch.arange(live, dtype=torch.float64) * 0.5 * math.log(2), 0)
            top = s.flip(0)
            i = max(0, live // 2 - 1)
            threshold = float((top[i] * top[min(i + 1, live - 1)]).sqrt()) if live > 1 \
                else 0.5
        rows = []
        for b in range(B):
            dec = sorted(int(p) for p in logical[b] if p >= 0)
            rows.append(list(range(n_pre * bpp)) + [p * bpp + i for p in dec
                                                    for i in range(bpp)])
        W = (n_pre + L) * bpp
        blocks = torch.tensor([r + [-1] * (W - len(r)) for r in rows], dtype=torch.int32,
                              device=device)
        return {"bounds": bounds.contiguous(), "slot_logical": logical,
                "slot_ts": torch.where(ok, ts, -1),
                "refresh_k": torch.full((B,), -(-live // 2), dtype=torch.long, device=device),
                "seq_lens": torch.full((B,), seq_len, dtype=torch.int32, device=device),
                "t_now": torch.tensor([t_now], dtype=torch.long, device=device),
                "page_size": P, "threshold": threshold, "blocks": blocks,
                "kv_heads": kv_heads, "block_size": block_size}

    def reference(self, bounds, slot_logical, slot_ts, refresh_k, seq_lens, t_now, page_size,
                  threshold=None, blocks=None, kv_heads=None, block_size=None, scores=None):
        """The rule's refresh (sparsegen.methods.milestone: MilestoneDecoder's torch path,
        with rank_order) from the bounds, in fp64, and its non-hybrid selection."""
        from ..methods.milestone import _BIG, rank_order

        live = slot_logical >= 0
        # bounds carry log2(e): a base-2 softmax per head, then the mean over heads
        z = bounds.double() * math.log(2.0)
        score = torch.softmax(z, -1).nan_to_num(0.0).mean(1).float()
        if threshold is not None:
            hit = live & (score > threshold)
        else:
            order = rank_order(score.masked_fill(~live, float("-inf")),
                               torch.where(live, slot_logical, _BIG))
            take = torch.arange(order.shape[-1], device=score.device) < refresh_k[:, None]
            hit = torch.zeros_like(live).scatter(-1, order, take) & live
        cur = (seq_lens.long() - 1) // page_size
        hit |= live & (slot_logical == cur[:, None])
        out = (score, torch.where(hit, t_now, slot_ts))
        if blocks is None:
            return out
        nb = (seq_lens.long() + block_size - 1) // block_size
        ok = (blocks >= 0) & (blocks < nb[:, None])
        idx = torch.where(ok, blocks, -1).to(torch.int32)
        counts = ok.sum(-1).to(torch.int32)
        return out + (idx[:, None, :].expand(-1, kv_heads, -1).contiguous(),
                      counts[:, None].expand(-1, kv_heads).contiguous())

    def select(self, blocks, seq_lens, kv_heads, block_size):
        """Selection only: every KV head gets blocks[b]'s entries below ceil(seq_lens[b] /
        block_size) -> (indices [B, kv_heads, W] int32, counts [B, kv_heads] int32)."""
        idx, counts, W = self._select_outputs(blocks, kv_heads)
        self._launch("milestone_select", blocks.shape[0], blocks, seq_lens, idx, counts, W,
                     kv_heads, block_size, blocks.stride(0), idx.stride(0), idx.stride(1),
                     counts.stride(0))
        return idx, counts
