"""CPU: how long block_select's tuning candidates take to compile for sm_90 (no GPU needed).

    python bench/select_compile_probe.py [--timeout 90] [--jobs 2] [--statics seer quest]

The tuner compiles candidates in CPU workers; a config whose compile stalls holds a worker for
its whole limit, which is what cut the example specs' block_select tuning short (bench/NOTES.md).
For the example specs' block_select statics (seer: block 64, 1 row, current block excluded;
nsa: block 64, 1 row; quest: block 16, 4 rows), every feasible (algo, radix_chunk, num_warps)
at the default chunk is compiled in its own process (Triton's cache off) under a time limit.
Writes bench/results/CPU-block-select-compile.{md,json} with the host's CPU model and core count.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsegen.codegen.select_kernels import ALGOS, SelectStatic, TritonBlockSelect  # noqa: E402

STATICS = {"seer": SelectStatic(64, "topk", 1, exclude_current=True),
           "nsa": SelectStatic(64, "topk", 1),
           "quest": SelectStatic(16, "topk", 4)}
CHILD = r"""
import json, sys
from sparsegen.codegen.select_kernels import SelectStatic, TritonBlockSelect
static, config, build = json.loads(sys.argv[1])
TritonBlockSelect(SelectStatic(**static), config, build).compile_sm90()
"""


def candidates(names):
    for name in names:
        static = STATICS[name]
        space = TritonBlockSelect.tunable_space(static)
        base = TritonBlockSelect.default_config(static)
        for algo in ALGOS:
            for rc in space["radix_chunk"]:
                for warps in space["num_warps"]:
                    cfg = {**base, "algo": algo, "radix_chunk": rc, "num_warps": warps}
                    if TritonBlockSelect.check_config(static, cfg) is None:
                        yield name, static, cfg


def compile_time(item, timeout, build_root):
    name, static, cfg = item
    build = str(build_root / f"{name}-{cfg['algo']}-{cfg['radix_chunk']}-{cfg['num_warps']}")
    env = {**os.environ, "TRITON_CACHE_DIR": build + "-cache", "TRITON_INTERPRET": "0"}
    arg = json.dumps([static.as_dict(), cfg, build])
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, arg], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
        status = "ok" if r.returncode == 0 else "error: " + r.stderr.strip().splitlines()[-1][:120]
    except subprocess.TimeoutExpired:
        status = f"> {timeout} s"
    row = {"static": name, **cfg, "seconds": round(time.time() - t0, 1), "status": status,
           "keys_per_thread": cfg["radix_chunk"] // (32 * cfg["num_warps"])}
    print(json.dumps(row), flush=True)
    return row


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_markdown(rows, facts, path):
    lines = [f"# block_select compile times for sm_90 on {facts['cpu']}", "",
             f"- date: {facts['date']}", f"- host: {facts['cores']} cores; {facts['versions']}",
             f"- command: `{facts['command']}`",
             "- one process per candidate (import + render + compile; Triton cache off), "
             f"{facts['jobs']} at a time; chunk at the default; seconds include ~"
             f"{facts['baseline_s']} s of process start and imports (the fastest candidate)", "",
             "| static | algo | radix_chunk | num_warps | keys a thread | seconds | status |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["static"], r["algo"], r["radix_chunk"],
                                         r["num_warps"])):
        lines.append(f"| {r['static']} | {r['algo']} | {r['radix_chunk']} | {r['num_warps']} | "
                     f"{r['keys_per_thread']} | {r['seconds']} | {r['status']} |")
    path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=int, default=90)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--statics", nargs="+", choices=list(STATICS), default=list(STATICS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "CPU-block-select-compile"))
    args = ap.parse_args()
    import tempfile

    import triton

    build_root = Path(tempfile.mkdtemp(prefix="sg-select-compile-"))
    items = list(candidates(args.statics))
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda it: compile_time(it, args.timeout, build_root), items))
    facts = {"cpu": cpu_model(), "cores": os.cpu_count(), "jobs": args.jobs,
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "versions": f"triton {triton.__version__}, python {platform.python_version()}",
             "command": "python " + " ".join(sys.argv),
             "baseline_s": min(r["seconds"] for r in rows if r["status"] == "ok")}
    stem = Path(args.out)
    stem.with_suffix(".json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1))
    write_markdown(rows, facts, stem.with_suffix(".md"))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
