"""The spec language: a YAML file describing one sparse-attention variant.

The dataclasses below are the single source of truth: each field carries its check in
`metadata["check"]`, and `load_spec` walks them to validate a file, fill defaults and build
a frozen `Spec`. Cross-field rules (group size, page vs block size, budget vs always-on
blocks, what each rule needs) live in `_check_combinations`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError

RULES = ("gate", "topk", "entmax", "milestone")
BACKENDS = ("tilelang", "triton")
PHASES = ("decode", "prefill")
MAX_GROUP = 16  # the kernels pack a GQA group into one tile of at most 16 rows


# ---------------------------------------------------------------------------------------
# Field checks: each returns the normalized value or raises _Bad(allowed-text).
# ---------------------------------------------------------------------------------------
class _Bad(Exception):
    pass


@dataclass(frozen=True)
class Int:
    lo: int | None = None
    hi: int | None = None
    pow2: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        what = "a power of two" if self.pow2 else "an integer"
        if self.lo is not None and self.hi is not None:
            return f"{what} from {self.lo} to {self.hi}"
        if self.lo is not None:
            return f"{what} >= {self.lo}"
        return what

    def __call__(self, v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f"must be {self.describe()}")
        if self.choices and v not in self.choices:
            raise _Bad(f"must be {self.describe()}")
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            raise _Bad(f"must be {self.describe()}")
        if self.pow2 and (v <= 0 or v & (v - 1)):
            raise _Bad(f"must be {self.describe()}")
        return v


@dataclass(frozen=True)
class Float:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        lo = "(" if self.lo_open else "["
        hi = ")" if self.hi_open else "]"
        a = "-inf" if self.lo is None else f"{self.lo:g}"
        b = "inf" if self.hi is None else f"{self.hi:g}"
        return f"a number in {lo}{a}, {b}{hi}"

    def __call__(self, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _Bad(f"must be {self.describe()}")
        v = float(v)
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            raise _Bad(f"must be {self.describe()}")
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            raise _Bad(f"must be {self.describe()}")
        return v


@dataclass(frozen=True)
class Choice:
    options: tuple

    def __call__(self, v):
        if not isinstance(v, str) or v not in self.options:
            raise _Bad("must be one of " + ", ".join(self.options))
        return v


@dataclass(frozen=True)
class Bool:
    def __call__(self, v):
        if not isinstance(v, bool):
            raise _Bad("must be true or false")
        return v


@dataclass(frozen=True)
class Name:
    def __call__(self, v):
        if not isinstance(v, str) or not v or not all(c.isalnum() or c in "-_." for c in v):
            raise _Bad("must be a non-empty name of letters, digits, '-', '_' or '.'")
        return v


@dataclass(frozen=True)
class Optional:
    inner: Any

    def __call__(self, v):
        return None if v is None else self.inner(v)


@dataclass(frozen=True)
class ListOf:
    item: Any
    min_len: int = 0
    unique: bool = True

    def __call__(self, v):
        # a single scalar where a list is expected is a common slip: say so plainly
        if not isinstance(v, list):
            raise _Bad("must be a list (YAML `[a, b]` or one `- item` per line)")
        if len(v) < self.min_len:
            raise _Bad(f"must list at least {self.min_len} item(s)")
        out = []
        for i, item in enumerate(v):
            try:
                out.append(self.item(item))
            except _Bad as e:
                raise _Bad(f"item {i} ({item!r}) {e}") from None
        if self.unique and len(set(out)) != len(out):
            raise _Bad("must not repeat an item")
        return tuple(out)


def _f(check, default=dataclasses.MISSING, doc=""):
    """A spec field: its check, its default (none = required) and one line of help."""
    kw = {"metadata": {"check": check, "doc": doc}}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple default")
    if default is not dataclasses.MISSING:
        kw["default"] = default
    return field(**kw)


def _section(cls, doc=""):
    return field(default_factory=cls, metadata={"section": cls, "doc": doc})


# ---------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    num_q_heads: int = _f(Int(lo=1, hi=1024), doc="query heads (Hq)")
    num_kv_heads: int = _f(Int(lo=1, hi=1024), doc="KV heads (Hkv); Hq/Hkv is the GQA group")
    head_dim: int = _f(Int(choices=(64, 128)), doc="head dimension")
    dtype: str = _f(Choice(("bf16", "fp16")), "bf16", "activation and KV dtype")
    num_layers: int = _f(Int(lo=1, hi=1024), 32, "decoder layers")
    dense_layers: tuple = _f(ListOf(Int(lo=0)), (), "layers that stay dense")
    rope_theta: float = _f(Float(lo=0, lo_open=True), 10000.0, "RoPE base (gate RoPE)")

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@dataclass(frozen=True)
class CacheSpec:
    layout: str = _f(Choice(("contiguous", "paged")), "contiguous",
                     "contiguous [B,S,Hkv,D] or paged [pages,page_size,Hkv,D]")
    page_size: int | None = _f(Optional(Int(lo=1, hi=65536)), None,
                               "tokens per page (paged only; a multiple of block_size)")
    head_major: bool = _f(Bool(), False, "cache stored [.., Hkv, S, D] (strided view)")


@dataclass(frozen=True)
class GateParams:
    d_gate: int = _f(Int(lo=16, hi=1024, pow2=True), 128, "gate projection width")
    pooling: tuple = _f(ListOf(Choice(("max", "min", "mean")), min_len=1),
                        ("max", "min", "mean"), "block pooling of K, concatenated")
    rope: bool = _f(Bool(), True, "RoPE on gate q/k at the block's first token")
    rmsnorm: bool = _f(Bool(), False, "RMSNorm on gate q and k")
    query_reduction: str = _f(Choice(("concat", "mean")), "concat",
                              "how the group's query heads become one gate query")


@dataclass(frozen=True)
class TopkParams:
    score: str = _f(Choice(("upper_bound", "mean_pooled")), "upper_bound",
                    "Quest min/max bound or NSA-style mean-pooled keys")
    group: str = _f(Choice(("per_head", "shared")), "per_head",
                    "select per query head (Quest) or once per KV group by summed scores")


@dataclass(frozen=True)
class EntmaxParams:
    alpha: float = _f(Float(lo=1.0, hi=2.0, lo_open=True), 1.5, "entmax alpha")
    scale: float = _f(Float(lo=0, lo_open=True), 1.0, "c in s = c q.k/sqrt(D); sets sparsity")
    halley_iters: int = _f(Int(lo=1, hi=50), 4, "Halley steps for tau")
    prior: bool = _f(Bool(), True, "add log p of each block to its logits")


@dataclass(frozen=True)
class MilestoneParams:
    refresh_fraction: float | None = _f(Optional(Float(lo=0, hi=1, lo_open=True)), 0.5,
                                        "top fraction of pages that get the current step")
    refresh_threshold: float | None = _f(Optional(Float()), None,
                                         "or: pages scoring above this get the step")
    prefill_budget_tokens: int | None = _f(Optional(Int(lo=1)), None,
                                           "hybrid: top-k over prefill pages within this budget")


@dataclass(frozen=True)
class SelectionSpec:
    rule: str = _f(Choice(RULES), doc="selection rule")
    block_size: int = _f(Int(lo=16, hi=128, pow2=True), 64, "tokens per block")
    sink_blocks: int = _f(Int(lo=0, hi=1 << 20), 1, "always-on blocks at the start")
    local_blocks: int = _f(Int(lo=1, hi=1 << 20), 1,
                           "always-on blocks at the end (includes the current block)")
    budget_tokens: int | None = _f(Optional(Int(lo=1)), None, "token budget (top-k)")
    threshold: float | None = _f(Optional(Float(lo=0, hi=1, lo_open=True, hi_open=True)), None,
                                 "probability threshold (gate)")
    gate: GateParams = _section(GateParams, "gate rule (SeerAttention-R)")
    topk: TopkParams = _section(TopkParams, "topk rule (Quest / NSA)")
    entmax: EntmaxParams = _section(EntmaxParams, "entmax rule (DashAttention)")
    milestone: MilestoneParams = _section(MilestoneParams, "milestone rule (RaaS)")


@dataclass(frozen=True)
class TuningSpec:
    batch: tuple = _f(ListOf(Int(lo=1, hi=4096), min_len=1), (1, 8, 16), "batch sizes")
    seq_len: tuple = _f(ListOf(Int(lo=1, hi=1 << 24), min_len=1), (8192, 32768, 131072),
                        "cache lengths")
    trials: int = _f(Int(lo=1, hi=100000), 40, "Optuna trials per kernel and shape")
    sparsity: float = _f(Float(lo=0, hi=1, hi_open=True), 0.9,
                         "fraction of blocks skipped in tuning inputs")
    timeout_s: float = _f(Float(lo=0, lo_open=True), 60.0, "per-candidate time limit")
    seed: int = _f(Int(lo=0), 0, "sampler seed")


@dataclass(frozen=True)
class Spec:
    name: str = _f(Name(), doc="variant name (also the emitted package's name)")
    model: ModelSpec = _section(ModelSpec, "model shape")
    cache: CacheSpec = _section(CacheSpec, "KV cache layout")
    selection: SelectionSpec = _section(SelectionSpec, "block selection")
    phases: tuple = _f(ListOf(Choice(PHASES), min_len=1), ("decode",), "phases to build")
    backends: tuple = _f(ListOf(Choice(BACKENDS), min_len=1), BACKENDS, "backends to consider")
    tuning: TuningSpec = _section(TuningSpec, "tuning shapes and budget")
    source: str = field(default="<memory>", compare=False, metadata={"internal": True})

    @property
    def group_size(self) -> int:
        return self.model.group_size

    def to_dict(self) -> dict:
        """Normalized spec as plain data (defaults filled), for printing and hashing."""
        return _to_plain(self)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """YAML loader that refuses duplicate keys (yaml.safe_load keeps the last silently)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise SpecError(name, "", None, "no such file; give the path of a spec YAML file "
                        "(examples in examples/specs/)")
    if path.is_dir():
        raise SpecError(name, "", None, "is a directory; give the path of a spec YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(name, "", None, "is not UTF-8 text; a spec is a YAML text file") from None
    except OSError as e:
        raise SpecError(name, "", None, f"cannot be read ({e.strerror})") from None
    return parse_spec(text, name)


def parse_spec(text: str, source: str = "<string>") -> Spec:
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(source, "", None, f"is not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise SpecError(source, "", None, "is nested too deeply to be a spec") from None
    if data is None:
        raise SpecError(source, "", None, "is empty; a spec needs at least `name`, `model` "
                        "and `selection` (see examples/specs/)")
    if not isinstance(data, dict):
        raise SpecError(source, "", data, "the top level of a spec must be a mapping of keys "
                        "(name, model, cache, selection, phases, backends, tuning)")
    spec = _build(Spec, data, source, "")
    spec = dataclasses.replace(spec, source=source)
    _check_combinations(spec)
    return spec


def _build(cls, data, source: str, prefix: str):
    if not isinstance(data, dict):
        raise SpecError(source, prefix, data, "must be a mapping of keys: "
                        + ", ".join(_public_fields(cls)))
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean `{near[0]}`?)" if near else ""
            raise SpecError(source, _join(prefix, str(key)), data[key],
                            f"unknown key{hint}; allowed here: " + ", ".join(fields))
    values = {}
    for fname, f in fields.items():
        path = _join(prefix, fname)
        if "section" in f.metadata:
            values[fname] = _build(f.metadata["section"], data.get(fname, {}) or {}, source, path)
            continue
        if fname not in data:
            if f.default is dataclasses.MISSING:
                raise SpecError(source, path, None, f"is required: {f.metadata['doc']}, "
                                f"{_describe(f.metadata['check'])}")
            continue
        try:
            values[fname] = f.metadata["check"](data[fname])
        except _Bad as e:
            raise SpecError(source, path, data[fname], str(e)) from None
    return cls(**values)


def _describe(check) -> str:
    try:
        check(object())
    except _Bad as e:
        return str(e)
    return "see the docs"


def _public_fields(cls):
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _to_plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, tuple):
        return [_to_plain(x) for x in obj]
    return obj


def _check_combinations(spec: Spec) -> None:
    src, m, c, s = spec.source, spec.model, spec.cache, spec.selection
    if m.num_q_heads % m.num_kv_heads:
        raise SpecError(src, "model.num_q_heads", m.num_q_heads,
                        f"must be a multiple of model.num_kv_heads ({m.num_kv_heads}) for GQA")
    if m.group_size > MAX_GROUP:
        raise SpecError(src, "model.num_q_heads", m.num_q_heads,
                        f"gives a GQA group of {m.group_size}; the kernels pack a group into one "
                        f"tile of at most {MAX_GROUP} heads (raise num_kv_heads)")
    for i, layer in enumerate(m.dense_layers):
        if layer >= m.num_layers:
            raise SpecError(src, f"model.dense_layers[{i}]", layer,
                            f"must be a layer index below model.num_layers ({m.num_layers})")
    if c.layout == "paged":
        if c.page_size is None:
            raise SpecError(src, "cache.page_size", None,
                            "is required with cache.layout: paged (a multiple of "
                            f"selection.block_size = {s.block_size})")
        if c.page_size % s.block_size:
            raise SpecError(src, "cache.page_size", c.page_size,
                            f"must be a multiple of selection.block_size ({s.block_size}) so "
                            "that a block never straddles two pages")
    elif c.page_size is not None:
        raise SpecError(src, "cache.page_size", c.page_size,
                        "only applies to cache.layout: paged; remove it or set the layout")
    always_on = (s.sink_blocks + s.local_blocks) * s.block_size
    if s.budget_tokens is not None and s.budget_tokens < always_on:
        raise SpecError(src, "selection.budget_tokens", s.budget_tokens,
                        f"is below the always-on blocks: (sink_blocks {s.sink_blocks} + "
                        f"local_blocks {s.local_blocks}) x block_size {s.block_size} = "
                        f"{always_on} tokens; raise the budget or lower those counts")
    if s.rule == "gate":
        if (s.budget_tokens is None) == (s.threshold is None):
            raise SpecError(src, "selection", {"budget_tokens": s.budget_tokens,
                                               "threshold": s.threshold},
                            "the gate rule needs exactly one of budget_tokens (top-k) or "
                            "threshold (e.g. 0.004)")
        if s.gate.rope and s.gate.d_gate % 2:
            raise SpecError(src, "selection.gate.d_gate", s.gate.d_gate, "must be even for RoPE")
    elif s.rule in ("topk", "milestone"):
        if s.budget_tokens is None:
            raise SpecError(src, "selection.budget_tokens", None,
                            f"is required by the {s.rule} rule (e.g. 4096)")
        if s.threshold is not None:
            raise SpecError(src, "selection.threshold", s.threshold,
                            f"does not apply to the {s.rule} rule; remove it")
    elif s.rule == "entmax" and s.threshold is not None:
        raise SpecError(src, "selection.threshold", s.threshold,
                        "does not apply to the entmax rule (its sparsity comes from "
                        "selection.entmax.scale); remove it")
    if s.rule == "milestone":
        ms = s.milestone
        if (ms.refresh_fraction is None) == (ms.refresh_threshold is None):
            raise SpecError(src, "selection.milestone", {"refresh_fraction": ms.refresh_fraction,
                                                         "refresh_threshold": ms.refresh_threshold},
                            "needs exactly one of refresh_fraction or refresh_threshold "
                            "(set the other to null)")
        if c.layout != "paged":
            raise SpecError(src, "cache.layout", c.layout,
                            "the milestone rule evicts and reuses pages: use cache.layout: paged")
    for name, params in (("gate", s.gate), ("topk", s.topk), ("entmax", s.entmax),
                         ("milestone", s.milestone)):
        if name != s.rule and params != type(params)():
            raise SpecError(src, f"selection.{name}", _to_plain(params),
                            f"sets parameters of the {name} rule but selection.rule is "
                            f"{s.rule}; remove the section or change the rule")
