"""H100 benchmark of the generated sparse decode kernels (issue: the spine).

    python bench/decode.py                       # everything, bf16 and fp16
    python bench/decode.py --dtype bf16 --quick  # a subset

For each dtype x layout x batch x cache length x sparsity (Hq 32, Hkv 8, D 128, block 64):
checks every backend's output against the fp32 torch reference, then times (median of CUDA
events through triton.testing.do_bench, several input sets rotated so the selected KV is
never L2-resident) plain calls and CUDA-graph replays of: our Triton and TileLang kernels,
dense torch SDPA on the cuDNN backend, and FlexAttention (compiled; BlockMask from the
same selected blocks; the GQA group folded into the query length so flex takes its decode
kernel). Writes a markdown table and JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsegen.codegen.backend import decode_backend  # noqa: E402
from sparsegen.codegen.decode_api import DecodeStatic  # noqa: E402
from sparsegen.methods.sparse_decode_ref import sparse_decode_reference  # noqa: E402
from bench.baselines import cudnn_decode_variants  # noqa: E402
from bench.timing import (copy_bandwidth, gpu_facts, require_cuda, results_header,  # noqa: E402
                          save_results, time_graph, time_plain)

HQ, HKV, D, BLOCK = 32, 8, 128, 64
PAGE = 64
ROTATE = 4  # input sets per measurement (distinct selections and queries)


def random_selection(batch, num_blocks, count, device, gen):
    """[B, Hkv, count] unique random blocks per (b, h), in random order."""
    scores = torch.rand(batch, HKV, num_blocks, device=device, generator=gen)
    return scores.topk(count, dim=-1).indices.to(torch.int32)


def make_cache(batch, seq_len, dtype, layout, gen):
    shape = (batch, seq_len, HKV, D)
    k = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    if layout == "contiguous":
        return k, v, None
    pages_per_seq = seq_len // PAGE
    total = batch * pages_per_seq
    perm = torch.randperm(total, device="cuda", generator=gen)
    table = perm.view(batch, pages_per_seq).to(torch.int32)
    kp = torch.empty(total, PAGE, HKV, D, device="cuda", dtype=dtype)
    vp = torch.empty_like(kp)
    kp[perm] = k.view(total, PAGE, HKV, D)
    vp[perm] = v.view(total, PAGE, HKV, D)
    return kp, vp, table


FLEX_MAX_ELEMENTS = 2**31  # flex's decode template fails to compile at 2^31 elements (int32 indexing)


def flex_decode_fn(q, k, v, idx, counts, seq_len):
    """FlexAttention with the group folded into the query length: q [B, Hkv, G, D].

    Where a KV tensor reaches 2^31 elements flex cannot compile; the batch is then run in
    the fewest chunks that fit (each chunk its own call), which is flex at its best here.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B = q.shape[0]
    G = HQ // HKV
    per_seq = seq_len * HKV * D
    chunk = max(1, min(B, (FLEX_MAX_ELEMENTS - 1) // per_seq))
    compiled = flex_decode_fn.compiled
    num_blocks = math.ceil(seq_len / BLOCK)
    parts = []
    for s in range(0, B, chunk):
        e = min(B, s + chunk)
        n = e - s
        # flex wants index rows as wide as the number of KV blocks
        full = torch.zeros(n, HKV, 1, num_blocks, dtype=torch.int32, device="cuda")
        full[..., : idx.shape[-1]] = idx[s:e, :, None, :]
        zeros = torch.zeros(n, HKV, 1, dtype=torch.int32, device="cuda")
        mask = BlockMask.from_kv_blocks(zeros, torch.zeros_like(full),
                                        full_kv_num_blocks=counts[s:e, :, None].contiguous(),
                                        full_kv_indices=full, BLOCK_SIZE=(128, BLOCK),
                                        seq_lengths=(G, seq_len))
        parts.append((q[s:e].view(n, HKV, G, D), k[s:e].transpose(1, 2),
                      v[s:e].transpose(1, 2), mask))
    out = torch.empty(B, HQ, D, dtype=q.dtype, device="cuda")

    def run():
        for i, (qf, kf, vf, mask) in enumerate(parts):
            out[i * chunk:i * chunk + qf.shape[0]] = compiled(qf, kf, vf, block_mask=mask).view(
                qf.shape[0], HQ, D)
        return out
    run.chunks = len(parts)
    return run


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def bench_case(dtype_name, layout, batch, seq_len, sparsity, backends, gen, rows, check_flex):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    num_blocks = seq_len // BLOCK
    count = max(1, round((1 - sparsity) * num_blocks))
    k, v, table = make_cache(batch, seq_len, dtype, layout, gen)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    counts = torch.full((batch, HKV), count, dtype=torch.int32, device="cuda")
    sets = [(torch.randn(batch, HQ, D, device="cuda", dtype=dtype, generator=gen),
             random_selection(batch, num_blocks, count, "cuda", gen)) for _ in range(ROTATE)]
    sel_bytes = batch * HKV * count * BLOCK * D * 2 * k.element_size()
    dense_bytes = batch * HKV * seq_len * D * 2 * k.element_size()
    row = {"dtype": dtype_name, "layout": layout, "batch": batch, "seq_len": seq_len,
           "sparsity": sparsity, "selected_blocks": count, "selected_MB": sel_bytes / 1e6}
    # the reference over the contiguous form of the cache (checks paged indexing too)
    q0, idx0 = sets[0]
    ref = sparse_decode_reference(q0, k, v, idx0, counts, seq_lens, BLOCK, block_table=table,
                                  validate=False)
    static = DecodeStatic(block_size=BLOCK, head_dim=D, group_size=HQ // HKV, dtype=dtype_name,
                          layout=layout, page_size=PAGE if layout == "paged" else 0)
    for name in backends:
        try:
            kern = decode_backend(name)(static)
            calls = [lambda q=q, i=i: kern(q, k, v, i, counts, seq_lens, block_table=table)
                     for q, i in sets]
            err = rel_err(calls[0](), ref)
            row[f"{name}_err"] = err
            if not err < 1e-2:
                row[f"{name}_note"] = f"WRONG (rel err {err:.3g})"
                continue
            row[f"{name}_ms"] = time_plain(calls)
            row[f"{name}_graph_ms"] = time_graph(calls)
            row[f"{name}_TBps"] = sel_bytes / row[f"{name}_graph_ms"] / 1e9
        except Exception as e:  # a backend failure is a result, not the end of the run
            row[f"{name}_note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            traceback.print_exc()
    if layout == "contiguous":
        for variant, calls in cudnn_decode_variants([q for q, _ in sets], k, v):
            try:
                out = calls[0]()
                if count == num_blocks:
                    row[f"sdpa_{variant}_err"] = rel_err(out, ref)
                graph_ms = time_graph(calls)
                row[f"sdpa_{variant}_graph_ms"] = graph_ms
                if graph_ms < row.get("sdpa_graph_ms", float("inf")):
                    row.update(sdpa_variant=variant, sdpa_ms=time_plain(calls),
                               sdpa_graph_ms=graph_ms, sdpa_TBps=dense_bytes / graph_ms / 1e9)
            except Exception as e:
                row[f"sdpa_{variant}_note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            del calls
        if "sdpa_ms" not in row:
            row["sdpa_note"] = "no cuDNN formulation ran"
        if check_flex:
            try:
                calls = [flex_decode_fn(q, k, v, i, counts, seq_len) for q, i in sets]
                if calls[0].chunks > 1:
                    row["flex_chunks"] = calls[0].chunks
                row["flex_err"] = rel_err(calls[0](), ref)
                if not row["flex_err"] < 1e-2:
                    raise RuntimeError(f"WRONG (rel err {row['flex_err']:.3g})")
                row["flex_ms"] = time_plain(calls)
                try:
                    row["flex_graph_ms"] = time_graph(calls)
                except Exception as e:
                    row["flex_graph_note"] = f"graph capture failed: {type(e).__name__}"
            except Exception as e:
                row["flex_note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    del k, v, table, sets
    torch.cuda.empty_cache()
    rows.append(row)
    print(json.dumps(row), flush=True)


def best_graph(row, name):
    return row.get(f"{name}_graph_ms") or row.get(f"{name}_ms")


def write_markdown(rows, facts, args, path):
    lines = [*results_header("Sparse decode attention", facts),
             f"- measured copy bandwidth (read+write): {facts['copy_TBps']:.2f} TB/s",
             f"- Hq {HQ}, Hkv {HKV}, D {D}, block {BLOCK}, page {PAGE} (paged layout), "
             f"{ROTATE} input sets rotated; times are medians in ms; `graph` = CUDA-graph replay",
             "- speedup = cuDNN dense graph time / kernel graph time (paged rows use the "
             "contiguous cuDNN time of the same shape); TB/s counts the selected K+V bytes",
             "- cuDNN is timed in three formulations (fold: group folded into the query length; "
             "gqa: enable_gqa on the [B,S,Hkv,D] cache; gqa-hm: enable_gqa on a head-major "
             "contiguous copy) and the fastest is shown, named in brackets", ""]
    head = ("| dtype | layout | B | len | sparsity | sel blocks | triton ms (graph) | "
            "tilelang ms (graph) | cuDNN ms (graph) | flex ms (graph) | best speedup | "
            "best TB/s | errors |")
    lines += [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    dense = {(r["dtype"], r["batch"], r["seq_len"]): best_graph(r, "sdpa") for r in rows
             if r["layout"] == "contiguous" and best_graph(r, "sdpa")}
    for r in rows:
        base = dense.get((r["dtype"], r["batch"], r["seq_len"]))
        ours = [best_graph(r, b) for b in ("triton", "tilelang") if best_graph(r, b)]
        best = min(ours) if ours else None

        def cell(name):
            if f"{name}_ms" not in r:
                return r.get(f"{name}_note", "-")
            g = r.get(f"{name}_graph_ms")
            text = f"{r[f'{name}_ms']:.4f} ({g:.4f})" if g else f"{r[f'{name}_ms']:.4f}"
            chunks = r.get(f"{name}_chunks")
            variant = r.get(f"{name}_variant")
            return text + (f" in {chunks} batch chunks" if chunks else "") + (
                f" [{variant}]" if variant else "")
        errs = ", ".join(f"{b} {r[f'{b}_err']:.1e}" for b in ("triton", "tilelang", "flex")
                         if f"{b}_err" in r)
        sp = f"{base / best:.2f}x" if base and best else "-"
        bw = f"{r['selected_MB'] / 1e3 / best:.2f}" if best else "-"
        lines.append(f"| {r['dtype']} | {r['layout']} | {r['batch']} | {r['seq_len']} | "
                     f"{r['sparsity']} | {r['selected_blocks']} | {cell('triton')} | "
                     f"{cell('tilelang')} | {cell('sdpa')} | {cell('flex')} | {sp} | {bw} | "
                     f"{errs} |")
    lines += ["", *target_lines(rows, dense, facts)]
    path.write_text("\n".join(lines) + "\n")


# (description, row filter, minimum speedup over cuDNN) of the spine issue's figures
TARGETS = [
    ("sparsity 0.9, batch 8-16, 128K: >= 9x", lambda r: r["sparsity"] == 0.9 and
     r["batch"] in (8, 16) and r["seq_len"] == 131072, 9.0),
    ("sparsity 0.9, batch 8-16, 32K: >= 7.5x", lambda r: r["sparsity"] == 0.9 and
     r["batch"] in (8, 16) and r["seq_len"] == 32768, 7.5),
    ("sparsity 0.9, batch 1, 128K: >= 6x", lambda r: r["sparsity"] == 0.9 and
     r["batch"] == 1 and r["seq_len"] == 131072, 6.0),
    ("sparsity 0.9, batch 1, 32K: >= 4x", lambda r: r["sparsity"] == 0.9 and
     r["batch"] == 1 and r["seq_len"] == 32768, 4.0),
    ("sparsity 0.5, batch 8, 32K: >= 1.9x", lambda r: r["sparsity"] == 0.5 and
     r["batch"] == 8 and r["seq_len"] == 32768, 1.9),
    ("sparsity 0: within 10% of cuDNN (>= 0.909x)", lambda r: r["sparsity"] == 0.0, 1 / 1.1),
]


def target_lines(rows, dense, facts):
    """Each figure of the issue against the measured rows (graph times), met or missed."""
    def best(r):
        times = [best_graph(r, b) for b in ("triton", "tilelang") if best_graph(r, b)]
        return min(times) if times else None

    out = ["## Figures against the issue's targets (CUDA-graph times, best of our backends)", "",
           "| target | cases | met | worst case |", "|---|---|---|---|"]
    for text, keep, need in TARGETS:
        cases = [(dense[(r["dtype"], r["batch"], r["seq_len"])] / best(r), r) for r in rows
                 if keep(r) and best(r) and (r["dtype"], r["batch"], r["seq_len"]) in dense]
        if not cases:
            continue
        worst, wr = min(cases, key=lambda c: c[0])
        met = sum(s >= need for s, _ in cases)
        out.append(f"| {text} | {len(cases)} | {met}/{len(cases)} | {worst:.2f}x "
                   f"({wr['dtype']} {wr['layout']} B{wr['batch']} {wr['seq_len']}) |")
    floor = 0.9 * facts["copy_TBps"]
    bw = [(r["selected_MB"] / 1e3 / best(r), r) for r in rows if best(r) and
          r["sparsity"] == 0.9 and r["batch"] in (8, 16) and r["seq_len"] == 131072]
    if bw:
        worst, wr = min(bw, key=lambda c: c[0])
        out.append(f"| sparsity 0.9, batch 8-16, 128K: >= 90% of copy bandwidth "
                   f"({floor:.2f} TB/s) | {len(bw)} | {sum(b >= floor for b, _ in bw)}/{len(bw)} "
                   f"| {worst:.2f} TB/s ({wr['dtype']} {wr['layout']} B{wr['batch']}) |")
    flex = [(best(r), best_graph(r, "flex"), r) for r in rows
            if best(r) and best_graph(r, "flex")]
    if flex:
        slow = [(a / b, r) for a, b, r in flex if a >= b]
        out.append(f"| faster than FlexAttention on every configuration | {len(flex)} | "
                   f"{len(flex) - len(slow)}/{len(flex)} | "
                   f"{'none slower' if not slow else ', '.join(str(r['batch']) for _, r in slow)} |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16"])
    ap.add_argument("--layout", nargs="+", default=["contiguous", "paged"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 16])
    ap.add_argument("--seq-len", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--sparsity", nargs="+", type=float, default=[0.0, 0.5, 0.9])
    ap.add_argument("--backends", nargs="+", default=["triton", "tilelang"])
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 16 at 128K, sparsity 0.9")
    ap.add_argument("--out", default=None, help="results stem (default bench/results/<GPU>-decode-attention)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no GPU: merge earlier runs' JSON (e.g. one per dtype) into --out")
    args = ap.parse_args()
    if args.merge:
        runs = [json.loads(Path(p).read_text()) for p in args.merge]
        facts = dict(runs[0]["facts"])
        facts["command"] = "; ".join(r["facts"]["command"] for r in runs)
        # a later run's row replaces an earlier one of the same case
        keyed = {}
        for r in runs:
            for row in r["rows"]:
                keyed[tuple(row[k] for k in ("dtype", "layout", "batch", "seq_len",
                                             "sparsity"))] = row
        rows = list(keyed.values())
        stem = Path(args.out or ROOT / "bench" / "results" / f"{facts['gpu_slug']}-decode-attention")
        stem.with_suffix(".json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1))
        write_markdown(rows, facts, args, stem.with_suffix(".md"))
        return
    if args.quick:
        args.batch, args.seq_len, args.sparsity = [1, 16], [131072], [0.9]
    require_cuda()
    facts = gpu_facts()
    facts["copy_TBps"] = copy_bandwidth()
    print(json.dumps(facts), flush=True)
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention
        # one compiled graph per shape and dtype: past dynamo's default recompile limit
        # (8) flex silently falls back to eager, which is slow and gave wrong fp16 results
        torch._dynamo.config.recompile_limit = 256
        flex_decode_fn.compiled = torch.compile(flex_attention, dynamic=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for dtype in args.dtype:
        for layout in args.layout:
            for batch in args.batch:
                for seq_len in args.seq_len:
                    for sparsity in args.sparsity:
                        bench_case(dtype, layout, batch, seq_len, sparsity, args.backends, gen,
                                   rows, check_flex=not args.no_flex)
                        if os.environ.get("OUT"):  # partial results survive a time limit
                            Path(os.environ["OUT"], "partial-decode.json").write_text(
                                json.dumps({"facts": facts, "rows": rows}, indent=1))
    stem = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        f"{facts['gpu_slug']}-decode-attention")
    save_results(stem, facts, rows, lambda path: write_markdown(rows, facts, args, path))

if __name__ == "__main__":
    main()
