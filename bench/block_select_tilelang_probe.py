"""Top-k block selection in TileLang (templates/tilelang/block_select.py.j2) against the tuned
Triton block_select, same inputs, same run (issue 5: scoring + selection <= 10 % of the step).

    python bench/block_select_tilelang_probe.py
    python bench/block_select_tilelang_probe.py --quest-only   # the Quest rows alone

For each decode shape (8 KV heads, block 64, sink 1 / local 1, 90 % of blocks skipped) every
TileLang config is first checked bit for bit against the torch reference
(sparsegen.methods.selection.select_topk) on random, tied and mixed-length scores; then both
kernels are timed per call of 8-call CUDA graphs (what a decode step sees) over 4 fresh score
sets. The Triton kernel runs the config the seer-attention-r spec's emitted module picks (its
nearest tuned bucket) where that is a Triton algo, else radix8 at 8 warps (the tuned Triton
winner before the TileLang select existed). Writes bench/results/<GPU>-block-select-tilelang.{md,json}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.block_select_probe import (check_selection, input_cases, inputs,  # noqa: E402
                                       triton_only)
from bench.emitted import tuned_rule_configs  # noqa: E402
from bench.timing import (gpu_facts, require_cuda, results_header, save_results,  # noqa: E402
                          time_graph_per_call)
from sparsegen.codegen.select_kernels import SelectStatic, TritonBlockSelect  # noqa: E402
from sparsegen.codegen.tilelang_select import TileLangTopk  # noqa: E402
from sparsegen.methods import selection as sel  # noqa: E402

KV_HEADS, BLOCK, SINK, LOCAL = 8, 64, 1, 1
SHAPES = [(8, 32768), (16, 32768), (8, 131072), (16, 131072)]


def quest_bounds(B, seq_len, block, gen, sets=4):
    """`sets` score sets [B, 32, blocks] of Quest's upper bounds over the step bench's cache
    (bench/methods_gate_topk.py's build: seq_len - 1 random keys a sequence), one fresh query
    each, with the lengths: the scores a decode step selects from. The randn scores the
    tuner uses spread over many exponents; these are positive and close together."""
    from bench import methods_gate_topk as gt
    from sparsegen.methods.topk import quest_scores_reference

    cache, dec, _ = gt.build("topk", block, gt.QUEST, B, seq_len, 0.9, "contiguous", gen)
    nb = -(-(seq_len - 1) // block)
    seq = torch.full((B,), seq_len - 1, dtype=torch.int32, device="cuda")
    out = []
    for _ in range(sets):
        q = torch.randn(B, gt.HQ, gt.D, device="cuda", dtype=gt.DT, generator=gen)
        out.append((quest_scores_reference(q, dec.meta, cache, "per_head", nb).contiguous(),
                    seq))
    del cache, dec
    torch.cuda.empty_cache()
    return out


def quest_rows(gen) -> list[dict]:
    """Quest per query head (4 score rows per KV head, k = 10 % / 4 a row): the whole select
    (each row's radix select, then the union of the group's rows) through block_select, the
    Triton kernels (block_threshold + union) against the TileLang ones (threshold + union),
    each checked bit for bit against the torch reference first, timed on random scores and
    on Quest's bounds of a random cache (`_bounds_us`)."""
    out = []
    for B, seq_len, block in [(8, 32768, 64), (16, 32768, 64), (8, 32768, 16),
                              (8, 131072, 64), (8, 131072, 16), (16, 131072, 16)]:
        nb, rows = seq_len // block, 4
        k = max(2, round(0.1 * nb / rows))
        width = sel.topk_width(k, SINK, LOCAL, nb, rows)
        static = SelectStatic(block, "topk", rows)
        default = TritonBlockSelect.default_config(static)
        H = KV_HEADS * rows
        kw = dict(k=k, sink=SINK, local=LOCAL, width=width)
        sets = [inputs(B, H, nb, block, gen) for _ in range(4)]
        outs = [(torch.empty(B, KV_HEADS, width, dtype=torch.int32, device="cuda"),
                 torch.empty(B, KV_HEADS, dtype=torch.int32, device="cuda")) for _ in sets]
        bounds = quest_bounds(B, seq_len, block, gen)
        tri_cfg = triton_only(default)
        row = {"part": "quest", "batch": B, "seq_len": seq_len, "block": block, "blocks": nb,
               "k": k, "triton_config": tri_cfg}
        kernels = {"triton": TritonBlockSelect(static, tri_cfg)}
        for threads in (256, 512):
            kernels[f"tilelang_t{threads}"] = TritonBlockSelect(
                static, {**default, "num_warps": threads // 32})
        for name, kern in kernels.items():
            try:
                check_selection(lambda s, n: kern(s, n, **kw),
                                lambda s, n: kern.reference(s, n, **kw),
                                input_cases(B, H, nb, block, gen) + [("Quest bound", *bounds[0])])
                for suffix, score_sets in (("_us", sets), ("_bounds_us", bounds)):
                    row[name + suffix] = 1000 * time_graph_per_call(
                        [lambda s=s, o=o: kern(s[0], s[1], out=o, **kw)
                         for s, o in zip(score_sets, outs)])
            except Exception as e:  # noqa: BLE001 - a failing config is a result
                row[name + "_note"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(row, flush=True)
        out.append(row)
        del bounds
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="results stem")
    ap.add_argument("--quick", action="store_true",
                    help="B8 x 32K and B16 x 128K at 256 threads, no Quest rows (~30 s)")
    ap.add_argument("--quest-only", action="store_true",
                    help="only the Quest rows (the whole per-head select, random scores and "
                         "Quest bounds)")
    args = ap.parse_args()
    require_cuda()
    shapes = [(8, 32768), (16, 131072)] if args.quick else SHAPES
    thread_counts = (256,) if args.quick else (256, 512, 1024)
    facts = gpu_facts()
    gen = torch.Generator(device="cuda").manual_seed(0)
    static = SelectStatic(BLOCK, "topk", 1, exclude_current=True)
    rows = []
    for B, seq_len in ([] if args.quest_only else shapes):
        nb = seq_len // BLOCK
        k = round(0.1 * nb)
        width = sel.topk_width(k, SINK, LOCAL, nb)
        cfgs, _ = tuned_rule_configs({"block_select": static}, ["seer-attention-r"], B, seq_len)
        tri_cfg = triton_only(cfgs.get("block_select", TritonBlockSelect.default_config(static)))
        tri = TritonBlockSelect(static, tri_cfg)
        kw = dict(k=k, sink=SINK, local=LOCAL, width=width)
        sets = [inputs(B, KV_HEADS, nb, BLOCK, gen) for _ in range(4)]
        outs = [(torch.empty(B, KV_HEADS, width, dtype=torch.int32, device="cuda"),
                 torch.empty(B, KV_HEADS, dtype=torch.int32, device="cuda")) for _ in sets]
        row = {"batch": B, "seq_len": seq_len, "blocks": nb, "k": k, "triton_config": tri_cfg}
        row["triton_us"] = 1000 * time_graph_per_call(
            [lambda s=s, o=o: tri(s[0], s[1], out=o, **kw) for s, o in zip(sets, outs)])
        for threads in thread_counts:
            name = f"tilelang_t{threads}"
            try:
                kern = TileLangTopk(BLOCK, threads, "indices")

                def select(scores, seq, kern=kern):
                    out = (torch.empty(B, KV_HEADS, width, dtype=torch.int32, device="cuda"),
                           torch.empty(B, KV_HEADS, dtype=torch.int32, device="cuda"))
                    kern(scores, seq, out, k, SINK, LOCAL)
                    return out

                check_selection(select, lambda s, n: tri.reference(s, n, **kw),
                                input_cases(B, KV_HEADS, nb, BLOCK, gen))
                row[name + "_us"] = 1000 * time_graph_per_call(
                    [lambda s=s, o=o: kern(s[0], s[1], o, k, SINK, LOCAL)
                     for s, o in zip(sets, outs)])
            except Exception as e:  # noqa: BLE001 - a failing config is a result
                row[name + "_note"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(row, flush=True)
        rows.append(row)
    if not args.quick:
        rows += quest_rows(gen)

    def write_markdown(path):
        lines = results_header("top-k block selection: TileLang vs tuned Triton", facts)
        lines += ["- rows without `part`: top-k of one score row per KV head (gate, NSA); "
                  "quest: the whole select of Quest per query head (4 rows a KV head, k = 10 % / 4 "
                  "a row; each row's radix select, then the union), the Triton kernels "
                  "(block_threshold + union, radix8 at the default config) vs TileLang "
                  "(threshold + union); on random scores, then (`bounds`) on Quest's upper "
                  "bounds of a random cache, the scores a decode step selects from",
                  "- 8 KV heads, block 64, sink 1, local 1, k = 10 % of the blocks; us per call "
                  "of 8-call CUDA graphs, 4 fresh score sets; every TileLang config checked bit "
                  "for bit against the torch reference first (random, tied, mixed lengths)", "",
                  "| B | len | blocks | k | triton us (tuned config) | tilelang 256 thr | 512 | "
                  "1024 | notes |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cells = [f"{r.get(f'tilelang_t{t}_us', float('nan')):.2f}" for t in (256, 512, 1024)]
            notes = "; ".join([f"{k}: {v}" for k, v in r.items() if k.endswith("_note")]
                              + [f"bounds: {k[:-10]} {v:.2f}" for k, v in r.items()
                                 if k.endswith("_bounds_us")])
            label = f"{r['batch']} {r['part']} b{r['block']}" if "part" in r else r["batch"]
            lines.append(f"| {label} | {r['seq_len']} | {r['blocks']} | {r['k']} | "
                         f"{r.get('triton_us', float('nan')):.2f} ({r['triton_config']}) | "
                         f"{' | '.join(cells)} | {notes} |")
        path.write_text("\n".join(lines) + "\n")

    stem = args.out or str(ROOT / "bench" / "results" / f"{facts['gpu_slug']}-block-select-tilelang")
    save_results(stem, facts, rows, write_markdown)


if __name__ == "__main__":
    main()
