"""GPU evaluation of one candidate: correctness gate against the reference, then timing.

Runs inside a GPU ChildWorker (sparsegen.tune.worker). `prepare(workload)` builds the
inputs of a shape bucket once per child: random q/k/v (never zeros) and random unique
selected blocks, in as many input sets as it takes for the selected KV of all sets to
exceed the L2 cache several times (where memory allows), so timed calls never hit a warm
L2. `evaluate(task)` then

  1. checks the candidate on a reduced ragged case (mixed lengths, partial last blocks,
     empty and full selections, padding that must not be read) and on the first full-size
     input set against `sparse_decode_reference`: max|out - ref| / max|ref| < tolerance,
     so a wrong kernel fails its trial and can never win;
  2. times it warm, rotating the input sets: plain calls with CUDA events (median, Python
     launch overhead included) and CUDA-graph replays of one call per set (median per
     call: the GPU time). The objective is the graph time, the plain time where capture
     fails; bandwidth is selected KV bytes over that time.

A rule's selection-side kernel (a RuleKernelPlan: block selection, gate scoring, ...) has a
workload of kind "rule": its input sets come from the adapter's own `bench_inputs`, the gate
compares every output with the adapter's `reference` on the first and last set (integer
outputs exactly, float outputs within the tolerance, with the same non-finite entries), and
the timing is the same; bandwidth there is input bytes over the time (selected KV bytes where
the inputs are a sparse decode's: a cache, block indices and counts).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, fields, is_dataclass

from .worker import CandidateError, make_adapter

DEFAULT_L2_BYTES = 50 * 1024 * 1024
L2_MULTIPLE = 4            # bytes touched per rotation, in L2 sizes
MAX_SETS = 32
MEMORY_SHARE = 0.5         # at most this share of free GPU memory goes to input sets
TARGET_MS = 150.0          # timing budget per method
_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_STATE: dict = {}          # inputs of the prepared workload, kept between candidates


@dataclass(frozen=True)
class Workload:
    """The inputs of one shape bucket of one kernel (plain data: it crosses processes)."""

    static: dict
    num_q_heads: int
    num_kv_heads: int
    batch: int
    seq_len: int
    selected_blocks: int
    head_major: bool = False
    seed: int = 0

    @classmethod
    def of(cls, kernel, shape, seed: int = 0) -> Workload:
        return cls(static=kernel.static.as_dict(), num_q_heads=kernel.num_q_heads,
                   num_kv_heads=kernel.num_kv_heads, batch=shape.batch,
                   seq_len=shape.seq_len, selected_blocks=kernel.selected_blocks(shape.seq_len),
                   head_major=kernel.head_major, seed=seed)

    def as_dict(self) -> dict:
        return asdict(self)


def workload_of(kernel, shape, seed: int = 0) -> dict:
    """The workload (plain data) of one shape bucket of an attention or rule kernel."""
    if not hasattr(kernel, "bench_kwargs"):
        return Workload.of(kernel, shape, seed=seed).as_dict()
    return {"kind": "rule", "adapter": _class_path(kernel.adapter),
            "static_cls": _class_path(type(kernel.static)), "static": kernel.static.as_dict(),
            "batch": shape.batch, "seq_len": shape.seq_len,
            "inputs": kernel.bench_kwargs(shape), "seed": seed}


def _class_path(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
def _cache(torch, w: Workload, lengths: list[int], gen, device):
    """k, v and block_table (paged) holding sequences of the given lengths."""
    s = w.static
    dtype = getattr(torch, _TORCH_DTYPE[s["dtype"]])
    D, Hkv = s["head_dim"], w.num_kv_heads
    B = len(lengths)

    def rand(*shape):
        if w.head_major:  # [.., Hkv, S, D] storage seen as [.., S, Hkv, D]
            shape = (shape[0], shape[2], shape[1], shape[3])
            return torch.randn(shape, generator=gen, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    if s["layout"] == "paged":
        P = s["page_size"]
        max_pages = math.ceil(max(lengths) / P)
        num_pages = B * max_pages
        k, v = rand(num_pages, P, Hkv, D), rand(num_pages, P, Hkv, D)
        # pages scattered over the pool, as in a real paged cache
        table = torch.randperm(num_pages, generator=gen, device=device).view(B, max_pages)
        return k, v, table.to(torch.int32)
    S = max(lengths)
    return rand(B, S, Hkv, D), rand(B, S, Hkv, D), None


def _uniform_inputs(torch, w: Workload, gen, device) -> dict:
    """A timing set: every sequence seq_len long, `selected_blocks` random unique blocks
    per (batch, KV head), in random order."""
    bs = w.static["block_size"]
    dtype = getattr(torch, _TORCH_DTYPE[w.static["dtype"]])
    k, v, table = _cache(torch, w, [w.seq_len] * w.batch, gen, device)
    nb = math.ceil(w.seq_len / bs)
    scores = torch.rand(w.batch, w.num_kv_heads, nb, generator=gen, device=device)
    idx = scores.argsort(dim=-1)[..., :w.selected_blocks].to(torch.int32).contiguous()
    return {
        "q": torch.randn(w.batch, w.num_q_heads, w.static["head_dim"], generator=gen,
                         device=device, dtype=dtype),
        "k": k, "v": v, "block_table": table, "block_indices": idx,
        "block_counts": torch.full((w.batch, w.num_kv_heads), w.selected_blocks,
                                   dtype=torch.int32, device=device),
        "seq_lens": torch.full((w.batch,), w.seq_len, dtype=torch.int32, device=device),
    }


def _ragged_inputs(torch, w: Workload, gen, device) -> dict:
    """The reduced correctness case: a few sequences of mixed lengths (partial last
    blocks), per-head counts from 0 to every block, the last block always selected (it
    is partial), and padding past each count that holds valid block ids, so a kernel
    that reads past the count gives a wrong answer instead of a lucky one."""
    bs = w.static["block_size"]
    dtype = getattr(torch, _TORCH_DTYPE[w.static["dtype"]])
    S = min(w.seq_len, 48 * bs + bs // 2 + 3)
    lengths = [S, max(1, S - bs - 5), max(1, S // 3 + 1)][:max(1, min(w.batch, 3))]
    B, Hkv = len(lengths), w.num_kv_heads
    k, v, table = _cache(torch, w, lengths, gen, device)
    max_sel = math.ceil(S / bs)
    idx = torch.zeros(B, Hkv, max_sel, dtype=torch.int32)
    counts = torch.zeros(B, Hkv, dtype=torch.int32)
    cpu = torch.Generator().manual_seed(w.seed + 1)
    for b, n in enumerate(lengths):
        nb = math.ceil(n / bs)
        for h in range(Hkv):
            if h == 1 and b == 0:
                c = 0                      # a head with nothing selected gets zeros
            elif h == 0:
                c = nb                     # every block: the dense case
            else:
                c = int(torch.randint(1, nb + 1, (1,), generator=cpu))
            others = torch.randperm(nb - 1, generator=cpu)[:max(0, c - 1)]
            chosen = torch.cat([torch.tensor([nb - 1]), others])[:c] if c else others[:0]
            chosen = chosen[torch.randperm(len(chosen), generator=cpu)]
            pad = torch.randint(0, nb, (max_sel - c,), generator=cpu)
            idx[b, h] = torch.cat([chosen, pad]).to(torch.int32)
            counts[b, h] = c
    return {
        "q": torch.randn(B, w.num_q_heads, w.static["head_dim"], generator=gen, device=device,
                         dtype=dtype),
        "k": k, "v": v, "block_table": table, "block_indices": idx.to(device),
        "block_counts": counts.to(device),
        "seq_lens": torch.tensor(lengths, dtype=torch.int32, device=device),
    }


DECODE_INPUTS = ("k", "v", "block_indices", "block_counts", "seq_lens")


def selected_kv_bytes(torch, static: dict, inputs: dict) -> int:
    """Bytes of K and V inside the selected blocks (the floor a sparse decode must read);
    static: the kernel's statics (block_size, head_dim, dtype)."""
    bs = static["block_size"]
    idx = inputs["block_indices"].long()
    live = torch.arange(idx.shape[-1], device=idx.device) < inputs["block_counts"][..., None]
    lens = inputs["seq_lens"].long()[:, None, None]
    tokens = ((lens - idx * bs).clamp(0, bs) * live).sum().item()
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}[static["dtype"]]
    return int(tokens) * static["head_dim"] * elem * 2


def _reference(inputs: dict, block_size: int):
    from ..methods.sparse_decode_ref import sparse_decode_reference

    return sparse_decode_reference(
        inputs["q"], inputs["k"], inputs["v"], inputs["block_indices"], inputs["block_counts"],
        inputs["seq_lens"], block_size, block_table=inputs["block_table"])


def prepare(workload: dict) -> dict:
    """Build (once per child) the inputs and reference outputs of a workload."""
    import torch

    if workload.get("kind") == "rule":
        return _prepare_rule(torch, workload)
    w = Workload(**workload)
    if _STATE.get("workload") == w:
        return _STATE["summary"]
    _STATE.clear()
    torch.cuda.empty_cache()
    if not torch.cuda.is_available():
        raise CandidateError("no CUDA device in the GPU worker", kind="error")
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(w.seed)
    bs = w.static["block_size"]
    ragged = _ragged_inputs(torch, w, gen, device)
    first = _uniform_inputs(torch, w, gen, device)
    sel_bytes = selected_kv_bytes(torch, w.static, first)
    set_bytes = sum(t.untyped_storage().nbytes() for t in first.values() if t is not None)
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    want = math.ceil(L2_MULTIPLE * l2 / max(1, sel_bytes))
    fit = int(MEMORY_SHARE * free // max(1, set_bytes)) + 1  # + the one already allocated
    sets = [first] + [_uniform_inputs(torch, w, gen, device)
                      for _ in range(max(1, min(want, fit, MAX_SETS)) - 1)]
    summary = {"sets": len(sets), "selected_kv_bytes": sel_bytes, "set_bytes": set_bytes,
               "l2_bytes": l2, "rotation_bytes": sel_bytes * len(sets)}
    _STATE.update(workload=w, sets=sets, ragged=ragged,
                  ragged_ref=_reference(ragged, bs), first_ref=_reference(first, bs),
                  summary=summary)
    torch.cuda.synchronize()
    return summary


# ---------------------------------------------------------------------------------------
# Gate and timing
# ---------------------------------------------------------------------------------------
def relative_error(out, ref) -> float:
    """max|out - ref| / max|ref| (inf when out holds NaN/inf)."""
    import torch

    out = out.float()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    scale = ref.abs().max().clamp_min(1e-6)
    return float((out - ref).abs().max() / scale)


def _call(adapter, inputs: dict):
    return adapter(inputs["q"], inputs["k"], inputs["v"], inputs["block_indices"],
                   inputs["block_counts"], inputs["seq_lens"],
                   block_table=inputs["block_table"])


def _check(adapter, inputs, ref, tolerance: float, what: str) -> float:
    out = _call(adapter, inputs)
    if tuple(out.shape) != tuple(ref.shape) or out.dtype != inputs["q"].dtype:
        raise CandidateError(f"{what}: output {tuple(out.shape)} {out.dtype}, want "
                             f"{tuple(ref.shape)} {inputs['q'].dtype}", kind="wrong")
    err = relative_error(out, ref)
    if not err < tolerance:
        raise CandidateError(f"{what}: max relative error {err:.3g} >= {tolerance:g} "
                             "against the reference", kind="wrong")
    return err


def _median_ms(torch, run, reps: int) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        run(i)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _reps(torch, run, n: int) -> int:
    """Repetitions that fill TARGET_MS, from one timed round of n runs."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(n):
        run(i)
    end.record()
    torch.cuda.synchronize()
    per = max(start.elapsed_time(end) / n, 1e-3)
    return max(10, min(2000, int(TARGET_MS / per)))


def time_plain(torch, adapter, sets, call=_call) -> float:
    """Median ms of one plain call, rotating the input sets (launch overhead included)."""
    def run(i):
        call(adapter, sets[i % len(sets)])

    for i in range(len(sets)):
        run(i)
    return _median_ms(torch, run, _reps(torch, run, len(sets)))


def time_graph(torch, adapter, sets, call=_call) -> float:
    """Median ms per call of a CUDA graph that calls the kernel once per input set."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as capture requires
        for s in sets:
            call(adapter, s)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in sets:
            call(adapter, s)
    graph.replay()

    def run(_):
        graph.replay()

    return _median_ms(torch, run, _reps(torch, run, 3)) / len(sets)


def evaluate(task: dict) -> dict:
    """Gate, then time one candidate; raises CandidateError(kind='wrong') if incorrect."""
    import torch

    if task["workload"].get("kind") == "rule":
        return _evaluate_rule(torch, task)
    w = Workload(**task["workload"])
    summary = prepare(task["workload"])
    adapter = make_adapter(task)
    tol = task.get("tolerance", 1e-2)
    ragged_err = _check(adapter, _STATE["ragged"], _STATE["ragged_ref"], tol, "reduced check")
    full_err = _check(adapter, _STATE["sets"][0], _STATE["first_ref"], tol,
                      f"full-size check (b{w.batch} s{w.seq_len})")
    sets = _STATE["sets"]
    plain = time_plain(torch, adapter, sets)
    graph_error = None
    try:
        graph = time_graph(torch, adapter, sets)
    except Exception as e:  # noqa: BLE001 - an uncapturable call still has a plain time
        graph, graph_error = None, f"{type(e).__name__}: {str(e)[:200]}"
        torch.cuda.synchronize()
    median = graph if graph is not None else plain
    return {
        "median_ms": median, "plain_ms": plain, "graph_ms": graph,
        "bandwidth_gbs": summary["selected_kv_bytes"] / (median * 1e-3) / 1e9,
        "max_rel_err": max(ragged_err, full_err), "input_sets": summary["sets"],
        "graph_error": graph_error,
    }


# ---------------------------------------------------------------------------------------
# Rule kernels: inputs from the adapter's bench_inputs, gate against its reference
# ---------------------------------------------------------------------------------------
def _tensors(obj) -> list:
    """The tensors of a kernel's inputs or outputs, in order: through tuples, lists, dicts
    and dataclass instances (a method's result types, e.g. entmax.Selection)."""
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    if is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in fields(obj) for t in _tensors(getattr(obj, f.name))]
    return [obj] if hasattr(obj, "untyped_storage") else []


def _call_rule(adapter, inputs: dict):
    return adapter(**inputs)


def rule_moved_bytes(torch, static: dict, inputs, set_bytes: int) -> int:
    """The bytes a rule kernel's bandwidth counts: its whole input set (set_bytes), except
    where the inputs are a sparse decode's (entmax's attention with its prior), which reads
    only the selected KV of the cache it is handed."""
    if isinstance(inputs, dict) and all(inputs.get(k) is not None for k in DECODE_INPUTS):
        return selected_kv_bytes(torch, static, inputs)
    return set_bytes


def _prepare_rule(torch, workload: dict) -> dict:
    from .worker import resolve

    if _STATE.get("workload") == workload:
        return _STATE["summary"]
    _STATE.clear()
    torch.cuda.empty_cache()
    if not torch.cuda.is_available():
        raise CandidateError("no CUDA device in the GPU worker", kind="error")
    cls = resolve(workload["adapter"])
    static = resolve(workload["static_cls"])(**workload["static"])

    def make(i):
        return cls.bench_inputs(static, workload["batch"], workload["seq_len"],
                                **workload["inputs"], device="cuda", seed=workload["seed"] + i)

    first = make(0)
    set_bytes = sum(t.untyped_storage().nbytes() for t in _tensors(first))
    props = torch.cuda.get_device_properties(torch.device("cuda"))
    l2 = getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES
    free, _ = torch.cuda.mem_get_info()
    want = math.ceil(L2_MULTIPLE * l2 / max(1, set_bytes))
    fit = int(MEMORY_SHARE * free // max(1, set_bytes)) + 1
    sets = [first] + [make(i) for i in range(1, max(1, min(want, fit, MAX_SETS)))]
    # the reference does not depend on the tile config: any feasible instance computes it
    ref = cls(static, cls.default_config(static), None)
    checks = [0] if len(sets) == 1 else [0, len(sets) - 1]
    refs = {i: ref.reference(**sets[i]) for i in checks}
    moved = rule_moved_bytes(torch, workload["static"], first, set_bytes)
    summary = {"sets": len(sets), "set_bytes": set_bytes, "moved_bytes": moved, "l2_bytes": l2,
               "rotation_bytes": set_bytes * len(sets)}
    _STATE.update(workload=workload, sets=sets, refs=refs, summary=summary)
    torch.cuda.synchronize()
    return summary


def _check_rule(torch, out, ref, tolerance: float, what: str) -> float:
    outs, want = _tensors(out), _tensors(ref)
    if len(outs) != len(want):
        raise CandidateError(f"{what}: {len(outs)} output tensor(s), the reference has "
                             f"{len(want)}", kind="wrong")
    err = 0.0
    for i, (o, r) in enumerate(zip(outs, want)):
        if tuple(o.shape) != tuple(r.shape):
            raise CandidateError(f"{what}: output {i} has shape {tuple(o.shape)}, want "
                                 f"{tuple(r.shape)}", kind="wrong")
        if not r.is_floating_point():
            if not torch.equal(o.to(r.dtype), r):
                raise CandidateError(f"{what}: output {i} differs from the reference "
                                     f"({int((o.to(r.dtype) != r).sum())} entries)",
                                     kind="wrong")
            continue
        o, r = o.float(), r.float()
        finite = torch.isfinite(r)
        if not torch.equal(torch.isfinite(o), finite) or not torch.equal(
                torch.nan_to_num(o[~finite], nan=0.0), torch.nan_to_num(r[~finite], nan=0.0)):
            raise CandidateError(f"{what}: output {i} has non-finite entries where the "
                                 "reference has none (or the reverse)", kind="wrong")
        e = relative_error(o[finite], r[finite]) if bool(finite.any()) else 0.0
        if not e < tolerance:
            raise CandidateError(f"{what}: output {i} max relative error {e:.3g} >= "
                                 f"{tolerance:g} against the reference", kind="wrong")
        err = max(err, e)
    return err


def _evaluate_rule(torch, task: dict) -> dict:
    summary = prepare(task["workload"])
    adapter = make_adapter(task)
    tol = task.get("tolerance", 1e-2)
    sets = _STATE["sets"]
    err = 0.0
    for i, ref in _STATE["refs"].items():
        out = _call_rule(adapter, sets[i])
        err = max(err, _check_rule(torch, out, ref, tol, f"check on input set {i}"))
    plain = time_plain(torch, adapter, sets, _call_rule)
    graph_error = None
    try:
        graph = time_graph(torch, adapter, sets, _call_rule)
    except Exception as e:  # noqa: BLE001 - an uncapturable call still has a plain time
        graph, graph_error = None, f"{type(e).__name__}: {str(e)[:200]}"
        torch.cuda.synchronize()
    median = graph if graph is not None else plain
    return {"median_ms": median, "plain_ms": plain, "graph_ms": graph,
            "bandwidth_gbs": summary["moved_bytes"] / (median * 1e-3) / 1e9,
            "max_rel_err": err, "input_sets": summary["sets"], "graph_error": graph_error}
