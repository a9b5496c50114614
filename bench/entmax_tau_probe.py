"""How fast the entmax tau solve can read the block summaries: its scoring tiles per program.

    python bench/entmax_tau_probe.py          # B 8 / 16 x 32K / 128K, 90 % skipped

The tau solve (EntmaxTauTriton: entmax_scores over the summaries, then entmax_select) at the
scale that skips 90 % of the blocks, for scoring configs (block_j, tiles, stages, num_warps;
the select part at its default), each first checked to select exactly what the default
config selects (indices, counts, priors). Times are CUDA-graph medians per call of one graph
that runs the solve over 4 copies of the summaries in turn, so every call reads its
summaries from memory as a decode layer does (one copy is L2-sized at B 8 / 32K).
Writes bench/results/<GPU>-entmax-tau-probe.{md,json}.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import methods_entmax_milestone as em  # noqa: E402
from bench.timing import (gpu_facts, note, require_cuda, results_header, save_results,  # noqa: E402
                          time_graph)
from sparsegen.codegen.entmax_kernels import EntmaxTauTriton  # noqa: E402

COPIES = 4
SWEEP = {"block_j": [32, 64, 128], "tiles": [1, 2, 4, 8], "stages": [2, 3],
         "num_warps": [4, 8]}


def solve_us(tau, qs, summs, seq, lengths) -> float:
    """us per solve: a CUDA graph that solves over the COPIES summaries in turn (each read
    from memory, as a decode layer's are)."""
    def run():
        for i in range(COPIES):
            tau(qs[i], summs[i], seq, lengths)
    return 1000 * time_graph([run]) / COPIES


@contextlib.contextmanager
def recorded(rows: list, row: dict):
    """One probe row, kept and printed however its block ends: a failure inside is noted in
    the row (a config that fails is a result) and the probe goes on."""
    try:
        yield row
    except Exception as e:  # noqa: BLE001
        note(row, "note", e)
    rows.append(row)
    print(json.dumps(row), flush=True)


def probe(batch, seq_len, gen, rows, args):
    k, v, seq, summ, qs, c = em.entmax_decode_state(batch, seq_len, 0.9, gen)
    del k, v
    summs = [summ] + [summ.clone() for _ in range(COPIES - 1)]
    lengths = [seq_len] * batch
    base = EntmaxTauTriton.default_config(em.ENTMAX_STATIC)
    want = None
    for values in itertools.product(*SWEEP.values()):
        config = {**base, **dict(zip(SWEEP, values))}
        with recorded(rows, {"batch": batch, "seq_len": seq_len,
                             **{k: config[k] for k in SWEEP}}) as row:
            tau = EntmaxTauTriton(em.ENTMAX_STATIC, config, scale=c)
            sel = tau(qs[0], summ, seq, lengths)
            got = (sel.indices.clone(), sel.counts.clone(), sel.bias.clone())
            if want is None:
                want = got
            row["same_selection"] = all(torch.equal(a, b) for a, b in zip(got, want))
            if not row["same_selection"]:
                raise RuntimeError("selects differently from the first config")
            row["tau_us"] = solve_us(tau, qs, summs, seq, lengths)
            row["default"] = config == base
    torch.cuda.empty_cache()


def write_markdown(rows, facts, path):
    lines = [*results_header("entmax tau solve: scoring tiles", facts),
             "- Hq 32, Hkv 8, D 128, block 64, bf16, 90 % of blocks skipped; us per solve "
             f"(CUDA graph over {COPIES} copies of the summaries in turn); select part at its "
             "default; every config selects exactly what the first does", ""]
    for shape in sorted({(r["batch"], r["seq_len"]) for r in rows}):
        rs = [r for r in rows if (r["batch"], r["seq_len"]) == shape and "tau_us" in r]
        if not rs:
            continue
        rs.sort(key=lambda r: r["tau_us"])
        d = next((r for r in rs if r.get("default")), None)
        lines += [f"## B {shape[0]}, {shape[1]} tokens: default "
                  f"{d['tau_us']:.1f} us" if d else f"## B {shape[0]}, {shape[1]} tokens", "",
                  "| block_j | tiles | stages | num_warps | us | vs default |",
                  "|---|---|---|---|---|---|"]
        for r in rs[:8]:
            vs = f"{d['tau_us'] / r['tau_us']:.2f}x" if d else "-"
            lines.append(f"| {r['block_j']} | {r['tiles']} | {r['stages']} | {r['num_warps']} "
                         f"| {r['tau_us']:.1f} | {vs} |")
        lines.append("")
    failed = [r for r in rows if "note" in r]
    if failed:
        lines += [f"{len(failed)} configs failed: " + "; ".join(
            f"{r['block_j']}/{r['tiles']}/{r['stages']}/{r['num_warps']}: {r['note'][:80]}"
            for r in failed[:6]), ""]
    path.write_text("\n".join(lines) + "\n")


def probe_main(doc: str, probe_fn, write_fn, results_name: str, add_args=None):
    """The command line of the tau probes: every (batch, seq_len) through probe_fn(batch,
    seq_len, gen, rows, args), then bench/results/<GPU>-<results_name>.{md,json} (or --out).
    add_args(parser) adds a probe's own options."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--seq-len", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--out", default=None, help="results stem")
    if add_args:
        add_args(ap)
    args = ap.parse_args()
    require_cuda()
    facts = gpu_facts()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for batch in args.batch:
        for seq_len in args.seq_len:
            probe_fn(batch, seq_len, gen, rows, args)
    stem = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        f"{facts['gpu_slug']}-{results_name}")
    save_results(stem, facts, rows, lambda path: write_fn(rows, facts, path))


def main():
    probe_main(__doc__, probe, write_markdown, "entmax-tau-probe")


if __name__ == "__main__":
    main()
