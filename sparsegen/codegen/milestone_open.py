"""Triton adapter of the milestone rule's page opening (templates/triton/milestone_open.py.j2):
one launch per decode step, before the append, that gives each page a token opens its decode
slot on the device, evicting the oldest decode page at the budget.

The host form (MilestoneDecoder._open_pages) picks the victim with a sync and maps the page on
the host, so a step that opened a page could not sit in a CUDA graph; with this launch every
step is device work only. It is tiny and branch-bound and is not tuned; its module sits apart
from milestone_kernels.py so that the tuned milestone_score / milestone_select entries, keyed
by that adapter's source, stay current."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .triton_kernel import TritonKernel, check_int_config, next_pow2


@dataclass(frozen=True)
class MilestoneOpenStatic:
    slots: int                 # decode slots per sequence (the rule's budget_pages)
    blocks_per_page: int       # the rule's page_size // block_size
    refresh_by_fraction: bool  # keep the top-fraction count REFK (not in threshold mode)
    write_blocks: bool         # keep the non-hybrid selection row

    def __post_init__(self):
        for name in ("slots", "blocks_per_page"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @classmethod
    def from_rule(cls, rule) -> "MilestoneOpenStatic":
        return cls(rule.budget_pages, rule.blocks_per_page, rule.refresh_fraction is not None,
                   not rule.hybrid)

    def as_dict(self) -> dict:
        return asdict(self)


class MilestoneOpenTriton(TritonKernel):
    name = "milestone_open"
    template = "triton/milestone_open.py.j2"

    @classmethod
    def tunable_space(cls, static) -> dict[str, list]:
        return {"num_warps": [1, 2, 4, 8]}

    @classmethod
    def default_config(cls, static) -> dict:
        return {"num_warps": 4 if static.slots * static.blocks_per_page > 256 else 1}

    @classmethod
    def check_config(cls, static, config) -> str | None:
        return check_int_config(config, ("num_warps",))

    def template_params(self) -> dict:
        s = self.static
        return {"slots_pad": next_pow2(s.slots), "blocks_per_page": s.blocks_per_page,
                "blocks_per_page_pad": next_pow2(s.blocks_per_page),
                "refresh_by_fraction": bool(s.refresh_by_fraction),
                "write_blocks": bool(s.write_blocks), **self.config}

    def signatures(self):
        sig = {"SEQ": "*i32", "TABLE": "*i32", "LOGICAL": "*i64", "TS": "*i64", "PHYS": "*i32",
               "SLOT_PAGE": "*i32", "REFK": "*i64", "REFK_TABLE": "*i64",
               "PREFILL_PAGES": "*i64", "BLOCKS": "*i32", "EVICTED": "*i64", "TNOW": "*i64",
               **{a: "i32" for a in ("L", "page_size", "stride_tb", "stride_lb", "stride_sb",
                                     "stride_pb", "stride_gb", "stride_kb")}}
        return [("milestone_open", sig, ("TABLE", "LOGICAL", "TS", "PHYS", "SLOT_PAGE"),
                 {"num_warps": self.config["num_warps"], "num_stages": 1})]

    def __call__(self, seq_lens, block_table, slot_logical, slot_ts, slot_phys, slot_pages,
                 refresh_k, refresh_k_table, prefill_pages, blocks, evicted, t_now,
                 page_size: int) -> None:
        """Open the pages the next tokens open (seq_lens [B] int32, before the append),
        in place: block_table [B, T] int32, slot_logical / slot_ts [B, L] int64, slot_phys /
        slot_pages [B, L] int32, refresh_k [B] int64 from refresh_k_table [L + 1] int64,
        prefill_pages [B] int64, blocks [B, W] int32 (the non-hybrid selection row; None
        when the static keeps none), evicted [B] int64 (the logical page evicted this step,
        -1 none), t_now [1] int64 (+1). No sync."""
        s = self.static
        B, L = slot_logical.shape
        if L != s.slots:
            raise ValueError(f"{L} slots per sequence; the kernel was built for {s.slots}")
        if (blocks is None) == s.write_blocks:
            raise ValueError("pass the selection row exactly when the kernel keeps it")
        for name, x, dt in (("seq_lens", seq_lens, torch.int32),
                            ("block_table", block_table, torch.int32),
                            ("slot_logical", slot_logical, torch.int64),
                            ("slot_ts", slot_ts, torch.int64),
                            ("slot_phys", slot_phys, torch.int32),
                            ("slot_pages", slot_pages, torch.int32),
                            ("refresh_k", refresh_k, torch.int64),
                            ("refresh_k_table", refresh_k_table, torch.int64),
                            ("prefill_pages", prefill_pages, torch.int64),
                            ("evicted", evicted, torch.int64), ("t_now", t_now, torch.int64)):
            if x.dtype != dt or x.stride(-1) != 1:
                raise TypeError(f"{name} must be {dt} with a contiguous last dim")
        if blocks is not None and (blocks.dtype != torch.int32 or blocks.stride(1) != 1):
            raise TypeError("blocks must be int32 [B, W] with a contiguous last dim")
        if refresh_k_table.numel() < L + 1:
            raise ValueError(f"refresh_k_table needs {L + 1} entries (live counts 0..{L})")
        row = blocks if blocks is not None else block_table  # an unread stand-in
        self.module.milestone_open[(B,)](
            seq_lens, block_table, slot_logical, slot_ts, slot_phys, slot_pages, refresh_k,
            refresh_k_table, prefill_pages, row, evicted, t_now, L, page_size,
            block_table.stride(0), slot_logical.stride(0), slot_ts.stride(0),
            slot_phys.stride(0), slot_pages.stride(0), row.stride(0),
            num_warps=self.config["num_warps"], num_stages=1)
