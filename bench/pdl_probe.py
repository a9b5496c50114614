"""What programmatic dependent launch (PDL) saves between a decode step's dependent kernels.

    python bench/pdl_probe.py [--out PATH_STEM]   # default bench/results/<GPU>-pdl-probe

A probe, not a method bench: a chain of six synthetic kernels shaped like one step of the
topk rule at batch 16 / 32K (append, metadata, scoring, a latency-bound select, a split
attention streaming ~200 MB, a merge), each reading its predecessor's output. Timed per
call of CUDA graphs of 8 chains, launched plainly and with PDL (every kernel's programs
call griddepcontrol.launch_dependents, then griddepcontrol.wait before reading the previous
kernel's output), and the same for a chain of six tiny kernels (the per-edge bound).
Results are checked against a plain-torch recomputation of the chain first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import (gpu_facts, require_cuda, results_header, save_results,  # noqa: E402
                          time_graph_per_call)

CHUNK = tl.constexpr(2048)


@triton.jit
def stage(PREV, X, OUT, n_prev, elems, PASSES: tl.constexpr, PDL: tl.constexpr):
    """OUT[pid] = PREV[pid % n_prev] + sum(X[pid * elems : (pid + 1) * elems]) * PASSES
    (the sum re-read PASSES times, each pass waiting on the last: a latency-bound chain)."""
    pid = tl.program_id(0)
    if PDL:
        gdc_launch_dependents()
    base = X + pid.to(tl.int64) * elems
    offs = tl.arange(0, CHUNK)
    total = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), 0)
    for p in tl.static_range(PASSES):
        dep = (total != total).to(tl.int32)  # always 0: the next pass waits on this one
        acc = tl.zeros([CHUNK], dtype=tl.float32)
        for i in range(0, elems, CHUNK):
            acc += tl.load(base + dep + i + offs, mask=i + offs < elems,
                           other=0.0).to(tl.float32)
        total += tl.sum(acc, 0)
    if PDL:
        gdc_wait()
    prev = tl.load(PREV + pid % n_prev)
    tl.store(OUT + pid, prev + total)


# (name, programs, bf16 elements per program, passes): one topk step at B16 / 32K / 10 %
STEP = [("append", 128, 128, 1), ("meta", 128, 256, 1), ("score", 512, 16384, 1),
        ("select", 128, 512, 6), ("attend", 256, 409600, 1), ("merge", 512, 1024, 1)]
TINY = [(f"tiny{i}", 128, 128, 1) for i in range(6)]


def build(chain, gen):
    xs = [torch.randn(p * e, device="cuda", dtype=torch.bfloat16, generator=gen)
          for _, p, e, _ in chain]
    outs = [torch.empty(p, device="cuda", dtype=torch.float32) for _, p, _, _ in chain]
    seed = torch.randn(1, device="cuda", generator=gen)
    return xs, outs, seed


def run_chain(chain, xs, outs, seed, pdl):
    prev = seed
    for (name, p, e, passes), x, out in zip(chain, xs, outs):
        stage[(p,)](prev, x, out, prev.numel(), e, PASSES=passes, PDL=pdl, num_warps=4,
                    launch_pdl=pdl)
        prev = out
    return prev


def reference(chain, xs, seed):
    prev = seed.double()
    for (name, p, e, passes), x in zip(chain, xs):
        sums = x.double().view(p, e).sum(1) * passes
        prev = prev[torch.arange(p, device=x.device) % prev.numel()] + sums
    return prev


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results stem (writes STEM.md and STEM.json)")
    args = ap.parse_args()
    require_cuda()
    facts = gpu_facts()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for label, chain in (("topk step B16 32K (synthetic)", STEP), ("6 tiny kernels", TINY)):
        sets = [build(chain, gen) for _ in range(3)]
        for pdl in (False, True):  # outputs checked before anything is timed
            xs, outs, seed = sets[0]
            ref = reference(chain, xs, seed)
            err = ((run_chain(chain, xs, outs, seed, pdl).double() - ref).abs().max()
                   / ref.abs().max()).item()
            if err > 1e-4:
                raise SystemExit(f"{label} pdl={pdl}: chain result off by {err:.2e}")
        times = {False: [], True: []}
        for _ in range(3):  # alternating, medians of each
            for pdl in (False, True):
                times[pdl].append(time_graph_per_call(
                    [lambda s=s, pdl=pdl: run_chain(chain, *s, pdl) for s in sets]))
        plain, pdl = (sorted(times[x])[1] for x in (False, True))
        rows.append({"chain": label, "kernels": len(chain), "plain_ms": plain, "pdl_ms": pdl,
                     "saved_us_per_edge": (plain - pdl) * 1e3 / (len(chain) - 1)})
        print(rows[-1], flush=True)

    def markdown(path):
        lines = results_header("PDL between dependent kernels", facts)
        lines += ["- per call of 8-call CUDA graphs, median of 3 alternating runs; each kernel "
                  "reads its predecessor's output (checked against torch first)", "",
                  "| chain | kernels | plain ms / chain | PDL ms / chain | saved us per edge |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['chain']} | {r['kernels']} | {r['plain_ms']:.4f} | {r['pdl_ms']:.4f} | "
                  f"{r['saved_us_per_edge']:.2f} |" for r in rows]
        path.write_text("\n".join(lines) + "\n")

    save_results(args.out or ROOT / "bench/results" / f"{facts['gpu_slug']}-pdl-probe",
                 facts, rows, markdown)


if __name__ == "__main__":
    main()
