"""From a validated Spec to the kernels the variant needs.

Each KernelPlan names one kernel kind with its static (compile-time) parameters, the
backends that may implement it with each one's tunable space and heuristic default, and
the shape buckets it is tuned for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .codegen.backend import decode_backend
from .codegen.decode_api import DecodeStatic
from .spec import Spec


@dataclass(frozen=True)
class ShapeBucket:
    batch: int
    seq_len: int

    @property
    def key(self) -> str:
        return f"b{self.batch}_s{self.seq_len}"


@dataclass(frozen=True)
class KernelPlan:
    name: str
    static: DecodeStatic
    num_q_heads: int
    num_kv_heads: int
    backends: tuple[str, ...]
    shapes: tuple[ShapeBucket, ...]
    selected_fraction: float  # share of blocks selected in tuning inputs (unbudgeted rules)
    budget_blocks: int | None = None  # blocks a budgeted rule selects, whatever the length
    head_major: bool = False

    def adapter_cls(self, backend: str):
        return decode_backend(backend)

    def space(self, backend: str) -> dict[str, list]:
        return decode_backend(backend).tunable_space(self.static)

    def default_config(self, backend: str) -> dict:
        return decode_backend(backend).default_config(self.static)

    def selected_blocks(self, seq_len: int) -> int:
        """Blocks a sequence of seq_len tokens selects in tuning and benchmark inputs."""
        num_blocks = math.ceil(seq_len / self.static.block_size)
        want = self.budget_blocks or round(self.selected_fraction * num_blocks)
        return max(1, min(num_blocks, want))


@dataclass(frozen=True)
class RuleKernelPlan:
    """A selection-side kernel of the rule (one Triton adapter class) as the tuner sees it:
    the same shape buckets and workload (heads, selected blocks) as the attention kernel."""

    name: str
    adapter: type
    static: object
    num_q_heads: int
    num_kv_heads: int
    shapes: tuple[ShapeBucket, ...]
    block_size: int
    selected_fraction: float
    budget_blocks: int | None = None
    head_major: bool = False
    backends: tuple[str, ...] = ("triton",)
    page_size: int = 0             # the cache's page (0: contiguous)

    def adapter_cls(self, backend: str):
        return self.adapter

    @property
    def tunable(self) -> bool:
        """Whether the adapter offers the tuner's GPU protocol (bench_inputs, reference)."""
        return callable(getattr(self.adapter, "bench_inputs", None)) and \
            callable(getattr(self.adapter, "reference", None))

    def selected_blocks(self, seq_len: int) -> int:
        num_blocks = math.ceil(seq_len / self.block_size)
        want = self.budget_blocks or round(self.selected_fraction * num_blocks)
        return max(1, min(num_blocks, want))

    def bench_kwargs(self, shape: ShapeBucket) -> dict:
        """Keyword arguments of adapter.bench_inputs this workload decides (those it takes)."""
        import inspect

        params = inspect.signature(self.adapter.bench_inputs).parameters
        known = {"heads": self.num_kv_heads, "kv_heads": self.num_kv_heads,
                 "q_heads": self.num_q_heads, "block_size": self.block_size,
                 "page_size": self.page_size,
                 "budget_blocks": self.selected_blocks(shape.seq_len)}
        return {k: v for k, v in known.items() if k in params}


def rule_kernel_plans(plan) -> list[RuleKernelPlan]:
    """The plan's rule kernels, tuned over the attention kernel's shape buckets."""
    rules = getattr(plan, "rule_kernels", ())
    if not rules or not plan.kernels:
        return []
    d = plan.kernels[0]
    # an adapter may tune its own buckets (tuning_shapes), e.g. a training-only kernel
    return [RuleKernelPlan(name=name, adapter=cls, static=static, num_q_heads=d.num_q_heads,
                           num_kv_heads=d.num_kv_heads,
                           shapes=getattr(cls, "tuning_shapes", lambda shapes: shapes)(d.shapes),
                           block_size=d.static.block_size, selected_fraction=d.selected_fraction,
                           budget_blocks=d.budget_blocks, page_size=d.static.page_size)
            for name, cls, static in rules]


@dataclass(frozen=True)
class Plan:
    spec: Spec
    kernels: tuple[KernelPlan, ...]  # tuned per shape bucket (the attention kernel)
    # the rule's scoring / selection / cache kernels: (name, adapter class, static params)
    rule_kernels: tuple = ()

    def describe(self) -> dict:
        out = []
        for k in self.kernels:
            out.append({
                "kernel": k.name,
                "static": k.static.as_dict(),
                "heads": {"q": k.num_q_heads, "kv": k.num_kv_heads},
                "shapes": [s.key for s in k.shapes],
                "selected_blocks": {s.key: k.selected_blocks(s.seq_len) for s in k.shapes},
                "backends": {b: {"tunables": k.space(b), "default": k.default_config(b)}
                             for b in k.backends},
            })
        for name, adapter, static in self.rule_kernels:
            static_dict = static.as_dict() if hasattr(static, "as_dict") else vars(static)
            out.append({"kernel": name, "static": dict(static_dict),
                        "backends": {"triton": {"tunables": adapter.tunable_space(static),
                                                "default": adapter.default_config(static)}}})
        return {"spec": self.spec.name, "kernels": out}


def make_plan(spec: Spec) -> Plan:
    m, c, s = spec.model, spec.cache, spec.selection
    static = DecodeStatic(block_size=s.block_size, head_dim=m.head_dim,
                          group_size=m.group_size, dtype=m.dtype, layout=c.layout,
                          page_size=c.page_size or 0)
    shapes = tuple(ShapeBucket(b, n) for b in spec.tuning.batch for n in spec.tuning.seq_len)
    decode = KernelPlan(
        name="sparse_decode", static=static, num_q_heads=m.num_q_heads,
        num_kv_heads=m.num_kv_heads, backends=spec.backends, shapes=shapes,
        selected_fraction=1.0 - spec.tuning.sparsity,
        budget_blocks=None if s.budget_tokens is None else s.budget_tokens // s.block_size,
        head_major=c.head_major)
    from .codegen.rule_kernels import rule_kernels

    return Plan(spec=spec, kernels=(decode,), rule_kernels=tuple(rule_kernels(spec)))
