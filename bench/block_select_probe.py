"""Which block_select algorithm and config is fastest for each decode shape (issue 5).

    python bench/block_select_probe.py              # every shape below, a few min on an H100
    python bench/block_select_probe.py --only b16   # shapes whose name contains "b16"

For each shape, every top-k algorithm of TritonBlockSelect (radix8: the original four 8-bit
histogram passes; count2 / count4: 16 / 8 counting passes; sort: bitonic sort of packed
(key, index) words) at a few (radix_chunk, num_warps), and the threshold mode for the gate
shape. Each config's output is first checked bit for bit against the torch reference
(sparsegen.methods.selection) on random scores, tied scores and mixed sequence lengths; a
config that disagrees or fails to compile is reported, not timed. Timings are medians of
CUDA-graph replays rotating over 4 fresh random score sets. Writes
bench/results/<GPU>-block-select-probe.{md,json}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import gpu_facts, require_cuda, results_header, save_results, time_graph
from sparsegen.codegen.select_kernels import ALGOS, SelectStatic, TritonBlockSelect
from sparsegen.codegen.triton_kernel import next_pow2
from sparsegen.methods import selection as sel

KV_HEADS = 8
SINK, LOCAL = 1, 1
# name, batch, seq_len, block_size, rows (score rows a KV head), k (0: threshold mode)
SHAPES = [("B16x128K b64 topk", 16, 131072, 64, 1, 205),
          ("B16x128K b64 threshold", 16, 131072, 64, 1, 0),
          ("B8x32K b64 topk", 8, 32768, 64, 1, 51),
          ("B8x128K b64 topk", 8, 131072, 64, 1, 205),
          ("B8x128K quest per-head b64", 8, 131072, 64, 4, 205),
          ("B8x128K quest per-head b16", 8, 131072, 16, 4, 706)]


def configs(static: SelectStatic, nb: int) -> list[dict]:
    """The original default first, then each algorithm with the row resident (radix_chunk
    = the row length rounded up) at a few warp counts; infeasible ones dropped."""
    cls = TritonBlockSelect
    topk = static.mode == "topk"
    default = cls.default_config(static)
    out = [dict(default, **({"algo": "radix8"} if topk else {}))]
    algos = list(ALGOS) if topk else [default["algo"]]
    resident = max(256, next_pow2(nb))
    chunk = default["chunk"]
    for algo in algos:
        for nw in (4, 8, 16):
            cfg = {"algo": algo, "chunk": max(chunk, 32 * nw // next_pow2(static.rows)),
                   "radix_chunk": resident, "num_warps": nw}
            if cls.check_config(static, cfg) is None and cfg not in out:
                out.append(cfg)
    return out


def inputs(B, H, nb, block, gen, kind="randn"):
    scores = torch.randn(B, H, nb, device="cuda", generator=gen)
    if kind == "ties":  # a handful of values: the k-th key's ties decide
        scores = (scores * 2).round()
    seq = torch.full((B,), nb * block, dtype=torch.int32, device="cuda")
    if kind == "mixed":  # every row length from 1 block up, one partial block each
        seq = torch.randint(1, nb * block + 1, (B,), device="cuda", generator=gen,
                            dtype=torch.int32)
        seq[0] = nb * block
    return scores, seq


def input_cases(B, H, nb, block, gen) -> list[tuple]:
    """(kind, scores, seq_lens) of every kind of inputs(): random, tied, mixed lengths."""
    return [(kind, *inputs(B, H, nb, block, gen, kind)) for kind in ("randn", "ties", "mixed")]


def check_selection(select, reference, cases) -> None:
    """Raise AssertionError unless select(scores, seq) gives reference(scores, seq)'s
    (indices, counts) exactly on every (kind, scores, seq) of cases."""
    for kind, scores, seq in cases:
        got, want = select(scores, seq), reference(scores, seq)
        if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
            raise AssertionError(f"differs from the torch reference on {kind} scores "
                                 f"({(got[0] != want[0]).sum().item()} entries)")


def triton_only(config: dict) -> dict:
    """A block_select config whose algo is the TileLang one as the Triton radix8 at 8 warps
    (the baseline of the A/Bs stays Triton once the tuned or default config is TileLang)."""
    if config["algo"] != "tilelang":
        return config
    return {**config, "algo": "radix8", "radix_chunk": 2048, "num_warps": 8}


def probe(shape, gen) -> list[dict]:
    name, B, seq_len, block, rows, k = shape
    nb = seq_len // block
    mode = "topk" if k else "softmax_threshold"
    static = SelectStatic(block, mode, rows, exclude_current=not k)
    H = KV_HEADS * rows
    kw = {"k": k, "threshold": 2.0 / nb, "sink": SINK, "local": LOCAL,
          "width": sel.topk_width(k, SINK, LOCAL, nb, rows) if k else nb}
    rows_out = []
    for cfg in configs(static, nb):
        row = {"shape": name, "batch": B, "seq_len": seq_len, "block": block, "rows": rows,
               "blocks": nb, "k": k, "mode": mode, "config": cfg}
        try:
            kern = TritonBlockSelect(static, cfg)
            check_selection(lambda s, n: kern(s, n, **kw), lambda s, n: kern.reference(s, n, **kw),
                            input_cases(B, H, nb, block, gen))
            sets = [inputs(B, H, nb, block, gen) for _ in range(4)]
            outs = [(torch.empty(B, KV_HEADS, kw["width"], dtype=torch.int32, device="cuda"),
                     torch.empty(B, KV_HEADS, dtype=torch.int32, device="cuda")) for _ in sets]
            row["graph_us"] = 1000 * time_graph(
                [lambda s=s, o=o, kern=kern: kern(s[0], s[1], out=o, **kw)
                 for s, o in zip(sets, outs)])
        except Exception as e:  # noqa: BLE001 - a failing config is a result
            row["note"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(row, flush=True)
        rows_out.append(row)
    return rows_out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="run the shapes whose name contains this")
    args = ap.parse_args()
    facts = gpu_facts()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape in SHAPES:
        if args.only in shape[0]:
            rows += probe(shape, gen)

    def write_md(path):
        L = [*results_header("block_select probe", facts),
             (f"- {KV_HEADS} KV heads, sink {SINK}, local {LOCAL}; CUDA-graph median over 4 "
              "fresh score sets; every config checked against the torch reference first "
              "(random, tied and mixed-length scores)"), ""]
        for shape in SHAPES:
            mine = [r for r in rows if r["shape"] == shape[0]]
            if not mine:
                continue
            timed = [r for r in mine if "graph_us" in r]
            best = min(timed, key=lambda r: r["graph_us"]) if timed else None
            L += [(f"## {shape[0]} ({mine[0]['blocks']} blocks a row, rows {shape[4]}, "
                   f"k {shape[5] or 'threshold'})"), "",
                  "| algo | radix_chunk | num_warps | chunk | graph us | note |",
                  "|---|---|---|---|---|---|"]
            for r in mine:
                c = r["config"]
                us = f"{r['graph_us']:.2f}" if "graph_us" in r else "-"
                if r is best:
                    us = f"**{us}**"
                note = r.get("note", "") or ("original default" if r is mine[0] else "")
                L.append(f"| {c['algo']} | {c['radix_chunk']} | {c['num_warps']} | "
                         f"{c['chunk']} | {us} | {note} |")
            L.append("")
        Path(path).write_text("\n".join(L) + "\n")

    stem = ROOT / "bench" / "results" / f"{facts['gpu_slug']}-block-select-probe"
    save_results(stem, facts, rows, write_md)


if __name__ == "__main__":
    require_cuda()
    main()
