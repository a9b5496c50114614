"""GPU timing shared by the bench scripts: medians of CUDA events, plain and graph-replayed,
rotating over several input sets so repeated runs never measure the L2 cache; the results'
header, files, errors and failure notes."""
from __future__ import annotations

import datetime
import platform
import re
import sys
import traceback
from pathlib import Path

import torch


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in fp32 (Frobenius norms)."""
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def fmt(x, spec=".3f") -> str:
    """A table cell: "-" for a missing value, floats by spec, anything else as str."""
    return "-" if x is None else (format(x, spec) if isinstance(x, float) else str(x))


def note(row, key, e) -> None:
    """Record exception e in row[key] (a failure is a result) and print its traceback."""
    row[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    traceback.print_exc()


def _rotating(fns):
    state = {"i": 0}

    def call():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()
    return call


def time_plain(fns, warmup_ms=25, rep_ms=120) -> float:
    """Median ms of plain calls (Python launch overhead included), rotating over fns."""
    from triton.testing import do_bench

    return do_bench(_rotating(fns), warmup=warmup_ms, rep=rep_ms, return_mode="median")


def capture(fn):
    """A CUDA graph of one call of fn (warmed on a side stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_graph(fns, warmup_ms=25, rep_ms=120) -> float:
    """Median ms of CUDA-graph replays (the GPU time a server sees), rotating over fns."""
    from triton.testing import do_bench

    graphs = [capture(fn) for fn in fns]
    return do_bench(_rotating([g.replay for g in graphs]), warmup=warmup_ms, rep=rep_ms,
                    return_mode="median")


GRAPH_CALLS = 8  # calls per graph of the benches' per-call timings


def time_graph_per_call(fns, calls: int = GRAPH_CALLS, warmup_ms=25, rep_ms=120) -> float:
    """Median ms per call of CUDA graphs that each hold `calls` calls of one of fns: the
    graph's own launch cost (~10-15 us on the H100) spread over them, as in a model whose
    one graph holds every layer. Compare like with like: a step timed this way against a
    baseline timed this way."""
    def repeated(fn):
        def run():
            for _ in range(calls):
                fn()
        return run
    return time_graph([repeated(fn) for fn in fns], warmup_ms, rep_ms) / calls


def copy_bandwidth(nbytes=4 << 30) -> float:
    """Device-to-device copy in TB/s, counting bytes read plus written."""
    from triton.testing import do_bench

    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return 2 * (nbytes // 2) / ms / 1e9


def require_cuda(hint: str = "") -> None:
    """A GPU bench run where there is no CUDA device stops with one line naming the script
    that was run (its path in the repo) and what runs without one, if anything, not with a
    traceback from its first CUDA call."""
    if not torch.cuda.is_available():
        script = Path(sys.argv[0]).resolve()
        root = Path(__file__).resolve().parents[1]
        name = script.relative_to(root).as_posix() if script.is_relative_to(root) else script.name
        sys.exit(f"{name} needs a CUDA GPU" + (f"; {hint}" if hint else ""))


def gpu_slug(name: str) -> str:
    m = re.search(r"(H100|H200|H20|A100|L40S?|B200|GH200)", name)
    return m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def gpu_facts() -> dict:
    """The results' header: the GPU, library versions, date and the command that ran."""
    import triton

    try:
        import tilelang
        tl_version = tilelang.__version__
    except Exception:  # the bench still runs the Triton rows without TileLang
        tl_version = "absent"
    name = torch.cuda.get_device_name(0)
    props = torch.cuda.get_device_properties(0)
    return {"gpu": name, "gpu_slug": gpu_slug(name),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "sms": props.multi_processor_count,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": f"torch {torch.__version__}, triton {triton.__version__}, "
                        f"tilelang {tl_version}, python {platform.python_version()}, "
                        f"CUDA {torch.version.cuda}",
            "command": "python " + " ".join(sys.argv)}


def results_header(title: str, facts: dict) -> list[str]:
    """The first lines of a results file: what was measured, on which GPU, when, with which
    versions, by which command."""
    return [f"# {title} on {facts['gpu']}", "", f"- date: {facts['date']}",
            f"- versions: {facts['versions']}", f"- command: `{facts['command']}`"]


def save_results(stem, facts: dict, rows: list, write_markdown, echo: bool = True) -> None:
    """Write <stem>.json and <stem>.md (through write_markdown(path)), print the table (unless
    echo is False: a bench saving after every row prints it once, at the end) and copy both
    to $OUT when set (the device tool brings $OUT back), unless the stem is already under
    $OUT: the tool brings back 8 files a call, and a copy spends two."""
    import json
    import os

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1))
    write_markdown(stem.with_suffix(".md"))
    if echo:
        print(stem.with_suffix(".md").read_text())
    out = os.environ.get("OUT")
    if out and not stem.resolve().is_relative_to(Path(out).resolve()):
        for suffix in (".md", ".json"):
            Path(out, stem.name + suffix).write_text(stem.with_suffix(suffix).read_text())
