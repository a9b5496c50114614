"""Where the sparse decode's fixed cost goes: cache layout, selection pattern, split count.

    python bench/decode_layout_probe.py            # B 8 and 16, 32K and 128K, 10 % and 25 %

The decode attention at 32K runs at 2.3-2.6 TB/s where cuDNN's dense decode runs at 3.0
(bench/NOTES.md). This probe asks whether the cache's layout is the cause. The module's cache
is sequence-major, [B, S, Hkv, D]: one KV head's 64-token block is 64 rows of 256 B, 2 KB
apart, and the heads' selections differ, so each DRAM page gives up one row. A head-major
cache, [B, Hkv, S, D], holds the same block as 16 KB in one piece.

For each shape it times the attention kernel the emitted seer-attention-r module picks (its
tuned bucket). The kernels take strides, so a head-major cache is passed as a permuted view
with no copy. It times four cases:
- a sequence-major cache and a head-major cache;
- each with per-head random selections (what the rules give) and with one selection shared
  by every KV head (every row of a DRAM page is read);
- on the sequence-major cache, a sweep of the split count;
- dense cuDNN SDPA on both layouts, as the yardstick;
- on a Triton kernel, its split launch alone (no merge), to price the merge;
- a plain read of the same number of bytes from one contiguous buffer (a one-launch Triton
  sum): what any kernel of this size can reach, ramp and tail included.

Every output is first checked against the fp32 torch reference. Each time is the median ms
per call of CUDA graphs of 8 calls, with ROTATE input sets in turn.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsegen.codegen.decode_api import DecodeStatic  # noqa: E402
from sparsegen.methods.sparse_decode_ref import sparse_decode_reference  # noqa: E402
from bench.baselines import cudnn_decode_variants  # noqa: E402
from bench.decode import random_selection  # noqa: E402
from bench.emitted import emitted_attention  # noqa: E402
from bench.timing import (fmt, gpu_facts, rel_err, require_cuda, results_header,  # noqa: E402
                          save_results, time_graph_per_call)

HQ, HKV, D, BLOCK = 32, 8, 128, 64
ROTATE = 4
SPLIT_SWEEP = (1, 2, 3, 4, 6, 8, 12, 16)
READ_CHUNK = 1 << 17  # bytes one program of the read floor sums (several programs an SM)


def decode_inputs(batch: int, seq_len: int, fraction: float, gen):
    """One probe case's inputs on the GPU: a random bf16 cache k, v [B, S, Hkv, D] of full
    sequences, ROTATE query sets qs and per-head random selections sels of `count` blocks
    (fraction of the num_blocks), the counts and lengths, and the selected K+V bytes."""
    num_blocks = seq_len // BLOCK
    count = max(1, round(fraction * num_blocks))
    k = torch.randn(batch, seq_len, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    qs = [torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
          for _ in range(ROTATE)]
    return types.SimpleNamespace(
        k=k, v=v, qs=qs, count=count, num_blocks=num_blocks,
        sels=[random_selection(batch, num_blocks, count, "cuda", gen) for _ in range(ROTATE)],
        seq_lens=torch.full((batch,), seq_len, dtype=torch.int32, device="cuda"),
        counts=torch.full((batch, HKV), count, dtype=torch.int32, device="cuda"),
        sel_bytes=batch * HKV * count * BLOCK * D * 2 * 2)


@functools.cache
def _read_sum_kernel():
    """The read floor's Triton kernel, defined once (a new @triton.jit per case would be a
    new function to compile each time)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _read_sum(x_ptr, out_ptr, n_words, CHUNK: tl.constexpr, TILE: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros([TILE], dtype=tl.float32)
        for off in range(0, CHUNK, TILE):
            i = pid * CHUNK + off + tl.arange(0, TILE)
            acc += tl.load(x_ptr + i, mask=i < n_words, other=0.0)
        tl.store(out_ptr + pid, tl.sum(acc, axis=0))
    return _read_sum


def read_floor_fn(nbytes: int, device="cuda"):
    """A one-launch read of nbytes from a contiguous buffer (each program sums a 128 KB chunk
    of fp32 with 16-byte loads into one word), as a call for time_graph_per_call."""
    import triton

    _read_sum = _read_sum_kernel()
    words = READ_CHUNK // 4
    buf = torch.rand(nbytes // 4, dtype=torch.float32, device=device)
    grid = triton.cdiv(buf.numel(), words)
    out = torch.empty(grid, dtype=torch.float32, device=device)

    def call():
        _read_sum[(grid,)](buf, out, buf.numel(), CHUNK=words, TILE=2048, num_warps=4)
    call()
    torch.cuda.synchronize() if buf.is_cuda else None
    return call, buf


class _NoLaunch:
    """Stands in for a Triton kernel that is not to run: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def split_only(kernel):
    """A call like kernel's that launches its split kernel and not its merge (Triton only)."""
    import copy

    kernel._prepare()
    split_alone = copy.copy(kernel)  # __getstate__ leaves out what _prepare sets: set it here
    split_alone._dtype, split_alone._kernels = kernel._dtype, (kernel._kernels[0], _NoLaunch())
    return split_alone


def probe_case(attend, batch, seq_len, fraction, gen, sweep: bool) -> dict:
    x = decode_inputs(batch, seq_len, fraction, gen)
    k, v, seq_lens, counts, qs, per_head = x.k, x.v, x.seq_lens, x.counts, x.qs, x.sels
    count, num_blocks, sel_bytes = x.count, x.num_blocks, x.sel_bytes
    # the same values stored head-major, seen through a [B, S, Hkv, D] view
    k_hm = k.transpose(1, 2).contiguous().transpose(1, 2)
    v_hm = v.transpose(1, 2).contiguous().transpose(1, 2)
    shared = [random_selection(batch, num_blocks, count, "cuda", gen)[:, :1].expand(
        batch, HKV, count).contiguous() for _ in range(ROTATE)]
    refs = {}  # id of a selection list -> the fp32 reference of its first set (one each)
    kernel = attend.module.kernel_for(k.device, batch, seq_len)
    row = {"batch": batch, "seq_len": seq_len, "fraction": fraction, "selected_blocks": count,
           "selected_MB": sel_bytes / 1e6, "backend": kernel.name, "config": kernel.config,
           "default_splits": kernel.num_splits(batch, HKV, count, k.device)}

    def timed(name, kk, vv, sels, num_splits=None):
        calls = [lambda q=q, i=i: kernel(q, kk, vv, i, counts, seq_lens,
                                         num_splits=num_splits)
                 for q, i in zip(qs, sels)]
        if id(sels) not in refs:
            refs[id(sels)] = sparse_decode_reference(qs[0], k, v, sels[0], counts, seq_lens,
                                                     BLOCK, validate=False)
        err = rel_err(calls[0](), refs[id(sels)])
        if not err < 1e-2:
            raise RuntimeError(f"{name}: output is WRONG (rel err {err:.3g}); nothing timed")
        ms = time_graph_per_call(calls)
        row[f"{name}_ms"] = ms
        row[f"{name}_TBps"] = sel_bytes / ms / 1e9

    for layout, kk, vv in (("seq", k, v), ("hm", k_hm, v_hm)):
        for pattern, sels in (("per_head", per_head), ("shared", shared)):
            timed(f"{layout}_{pattern}", kk, vv, sels)
    if kernel.name == "triton":
        alone = split_only(kernel)
        calls = [lambda q=q, i=i: alone(q, k, v, i, counts, seq_lens) for q, i in zip(qs, per_head)]
        row["split_only_ms"] = time_graph_per_call(calls)
        row["split_only_TBps"] = sel_bytes / row["split_only_ms"] / 1e9
    if sweep:
        for n in SPLIT_SWEEP:
            timed(f"seq_per_head_splits{n}", k, v, per_head, num_splits=n)
            timed(f"hm_per_head_splits{n}", k_hm, v_hm, per_head, num_splits=n)
    read, _buf = read_floor_fn(sel_bytes)
    row["read_floor_ms"] = time_graph_per_call([read])
    row["read_floor_TBps"] = sel_bytes / row["read_floor_ms"] / 1e9
    del read, _buf
    dense_bytes = batch * HKV * seq_len * D * 2 * 2
    for variant, calls in cudnn_decode_variants(qs, k, v):
        if variant in ("gqa", "gqa-hm"):
            ms = time_graph_per_call(calls)
            row[f"cudnn_{variant}_ms"] = ms
            row[f"cudnn_{variant}_TBps"] = dense_bytes / ms / 1e9
        del calls
    del x, k, v, k_hm, v_hm  # x holds the cache too: drop every reference before empty_cache
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def write_markdown(rows, facts, path):
    lines = results_header("Sparse decode: cache layout, selection pattern, split count", facts)
    lines += ["- Hq 32, Hkv 8, D 128, block 64, bf16; ms per call of CUDA graphs of 8 calls, "
              "medians; TB/s counts the selected K+V bytes (dense: every byte)",
              "- seq = cache [B, S, Hkv, D] (the module's); hm = the same values stored "
              "[B, Hkv, S, D], passed as a permuted view; per-head = a random selection per "
              "KV head (what the rules give); shared = one selection for every KV head",
              "- split alone: a Triton kernel's split launch without its merge (seq, per-head)",
              "- read floor: one launch reading the selected byte count from one contiguous "
              "buffer (a Triton sum), what a kernel of this size can reach",
              "- kernel: what the emitted seer-attention-r module runs at the shape (its tuned "
              "bucket), at its own split count unless a sweep column says otherwise",
              "", "| B | len | sel. blocks | backend (splits) | seq per-head | seq shared | "
              "hm per-head | hm shared | split alone | read floor | cuDNN seq | cuDNN hm |",
              "|" + "---|" * 12]

    def cell(r, name):
        return (f"{fmt(r[name + '_ms'], '.4f')} ({r[name + '_TBps']:.2f})"
                if name + "_ms" in r else "-")
    for r in rows:
        lines.append(f"| {r['batch']} | {r['seq_len']} | {r['selected_blocks']} | "
                     f"{r['backend']} ({r['default_splits']}) | {cell(r, 'seq_per_head')} | "
                     f"{cell(r, 'seq_shared')} | {cell(r, 'hm_per_head')} | "
                     f"{cell(r, 'hm_shared')} | {cell(r, 'split_only')} | {cell(r, 'read_floor')} | {cell(r, 'cudnn_gqa')} | {cell(r, 'cudnn_gqa-hm')} |")
    swept = [r for r in rows if "seq_per_head_splits1_ms" in r]
    if swept:
        lines += ["", "Split count swept (per-head selections; ms (TB/s)):", "",
                  "| B | len | sel. blocks | layout | " + " | ".join(map(str, SPLIT_SWEEP)) + " |",
                  "|" + "---|" * (4 + len(SPLIT_SWEEP))]
        for r in swept:
            for layout in ("seq", "hm"):
                lines.append(f"| {r['batch']} | {r['seq_len']} | {r['selected_blocks']} | {layout} | "
                             + " | ".join(cell(r, f"{layout}_per_head_splits{n}") for n in SPLIT_SWEEP)
                             + " |")
    lines += ["", "Configs: " + "; ".join(f"B{r['batch']}/{r['seq_len']}: {r['backend']} "
                                          f"`{json.dumps(r['config'], sort_keys=True)}`"
                                          for r in rows if r['fraction'] == rows[0]['fraction'])]
    path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--seq-len", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--fraction", nargs="+", type=float, default=[0.1, 0.25],
                    help="selected fraction of the blocks")
    ap.add_argument("--sweep-at", type=int, default=32768,
                    help="sweep the split count at this length (0: never)")
    ap.add_argument("--out", default=None,
                    help="results stem (default bench/results/<GPU>-decode-layout-probe)")
    args = ap.parse_args()
    require_cuda()
    facts = gpu_facts()
    static = DecodeStatic(block_size=BLOCK, head_dim=D, group_size=HQ // HKV, dtype="bf16",
                          layout="contiguous", page_size=0)
    attend, _ = emitted_attention(static, ["seer-attention-r"])
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for fraction in args.fraction:
        for batch in args.batch:
            for seq_len in args.seq_len:
                rows.append(probe_case(attend, batch, seq_len, fraction, gen,
                                       sweep=seq_len == args.sweep_at and fraction == args.fraction[0]))
                if os.environ.get("OUT"):  # partial results survive a time limit
                    Path(os.environ["OUT"], "partial-layout-probe.json").write_text(json.dumps(rows))
    stem = args.out or ROOT / "bench" / "results" / f"{facts['gpu_slug']}-decode-layout-probe"
    save_results(stem, facts, rows, lambda p: write_markdown(rows, facts, p))


if __name__ == "__main__":
    main()
