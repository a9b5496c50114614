"""H100 A/B of the gate rule's selection chain: one fused launch (gate_select) against the two
it replaced (gate_score, then block_select), in the same decode steps, same run.

    python bench/gate_select_ab.py [--batch 8 16] [--seq-len 32768 131072]

Each row builds the gate decode step of bench/methods_gate_topk.py (Hq 32, Hkv 8, D 128,
bf16, block 64, 90 % of blocks skipped, contiguous) and runs it with each selection chain:
  fused:    gate_select at the config the emitted seer-attention-r module picks (its nearest
            tuned bucket; the default where none is tuned);
  two-step: gate_score and block_select at the configs tuning_db/ recorded for them with
            these statics (nearest bucket), the chain the decoder ran before gate_select.
Both are first checked against the plain-torch selection (identical blocks). Timed: the
block mean (block_size steps in one CUDA graph / block_size), the selection alone (one
call per graph), and the step attending a fixed selection (the select share); dense cuDNN
SDPA per call of 8-call graphs for the speedups. The chains alternate A, B, A, B (medians
of each kind). Writes bench/results/<GPU>-gate-select-ab.{md,json} (and --out).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import methods_gate_topk as gt  # noqa: E402
from bench.baselines import fastest_cudnn_decode  # noqa: E402
from bench.emitted import recorded_rule_config  # noqa: E402
from bench.timing import (fmt, gpu_facts, note, results_header, save_results,  # noqa: E402
                          time_graph, time_graph_per_call)
from sparsegen.codegen.gate_kernels import GateScoreStatic, GateSelect  # noqa: E402
from sparsegen.codegen.select_kernels import SelectStatic  # noqa: E402

BS = 64


def two_step_chain(dec, batch, seq_len, gpu_slug=None):
    """GateSelect (gate_score -> block_select) at the configs tuning_db/ recorded for the
    decoder's statics (on this GPU, or the one gpu_slug names), and where they came from."""
    score_static = GateScoreStatic(BS, dec.gate.d_gate, "bf16")
    select_static = SelectStatic(BS, dec.mode, 1, exclude_current=True)
    score_cfg, score_from = recorded_rule_config("gate_score", score_static, batch, seq_len,
                                                 gpu_slug)
    select_cfg, select_from = recorded_rule_config("block_select", select_static, batch,
                                                   seq_len, gpu_slug)
    chain = GateSelect(BS, dec.gate.d_gate, dec.state.kc.dtype, dec.mode, score_cfg,
                       select_cfg)
    return chain, {"gate_score": [score_cfg, score_from], "block_select": [select_cfg,
                                                                         select_from]}


def same_selection(dec, cache, qn) -> bool:
    want = dec.select(qn, cache, impl="torch")
    got = dec.select(qn, cache, impl="triton")
    return torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def bench_row(batch, seq_len, sparsity, gen, gpu_slug=None) -> dict:
    row = {"batch": batch, "seq_len": seq_len, "sparsity": sparsity}
    try:
        cache, dec, source = gt.build("gate", BS, None, None, batch, seq_len, sparsity,
                                      "contiguous", gen)
        row["fused_config"] = dec.kernels.config
        row["fused_from"] = source.get("gate_select", "default")
        fused = dec.kernels
        two, row["two_step_configs"] = two_step_chain(dec, batch, seq_len, gpu_slug)
        attend, row["attention"] = gt.attention(BS, "contiguous")
        sets = [gt.step_inputs(batch, gen) for _ in range(gt.ROTATE)]
        n = seq_len - 1
        steps = [gt.step_fn(dec, cache, attend, *s[:3], s[3], s[4], n) for s in sets]
        blocks = [gt.step_fn(dec, cache, attend, *s[:3], s[3], s[4], seq_len - BS, steps=BS)
                  for s in sets]
        sels = [gt.select_fn(dec, cache, s[0], s[3]) for s in sets]
        chains = {"fused": fused, "two_step": two}
        for name, chain in chains.items():
            dec._kernels = chain
            steps[0]()
            row[f"{name}_same_selection"] = same_selection(dec, cache, sets[0][3])
        if not all(row[f"{k}_same_selection"] for k in chains):
            raise RuntimeError("a chain's selection differs from the torch reference")
        idx, cnt = gt.select_fn(dec, cache, sets[0][0], sets[0][3])()
        row["selected_blocks_mean"] = cnt.float().mean().item()
        times = {k: {"block": [], "select": []} for k in chains}
        for _ in range(2):  # A, B, A, B
            for name, chain in chains.items():
                dec._kernels = chain
                times[name]["block"].append(time_graph(blocks) / BS)
                times[name]["select"].append(time_graph(sels))
        dec._kernels = fused
        with gt.fixed_selection(dec, idx, cnt):
            row["nosel_block_mean_ms"] = time_graph(blocks) / BS
        _, dense, _ = fastest_cudnn_decode([s[0] for s in sets], cache.k[:, :seq_len],
                                           cache.v[:, :seq_len], time_graph)
        row["sdpa_per_call_ms"] = time_graph_per_call(dense)
        for name, t in times.items():
            block = sorted(t["block"])[len(t["block"]) // 2]
            row[f"{name}_block_mean_ms"] = block
            row[f"{name}_block_mean_runs_ms"] = t["block"]
            row[f"{name}_select_ms"] = sorted(t["select"])[len(t["select"]) // 2]
            row[f"{name}_speedup"] = row["sdpa_per_call_ms"] / block
            row[f"{name}_select_share"] = 1 - row["nosel_block_mean_ms"] / block
        row["fused_gain"] = row["two_step_block_mean_ms"] / row["fused_block_mean_ms"]
    except Exception as e:  # a failure is a result, not the end of the run
        note(row, "note", e)
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def write_markdown(rows, facts, path):
    lines = [*results_header("gate selection chain: fused gate_select vs gate_score + "
                             "block_select", facts),
             "- gate decode step, Hq 32, Hkv 8, D 128, bf16, block 64, contiguous; ms are "
             "medians; block mean = block_size steps in one CUDA graph / block_size; select = "
             "the chain alone, one call per graph; share = 1 - (steps attending a fixed "
             "selection) / step; speedup = dense cuDNN SDPA per call of 8-call graphs / block "
             "mean. The chains ran alternately (A, B, A, B), both checked first against the "
             "torch selection.", "",
             "| B | len | blocks sel | same selection fused / two-step | block mean ms fused / "
             "two-step | fused gain | select ms fused / two-step | select share fused / "
             "two-step | speedup fused / two-step | cuDNN ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['batch']} | {r['seq_len']} | failed: {r['note']} |")
            continue
        lines.append(
            f"| {r['batch']} | {r['seq_len']} | {r['selected_blocks_mean']:.0f} | "
            f"{r['fused_same_selection']} / {r['two_step_same_selection']} | "
            f"{fmt(r['fused_block_mean_ms'], '.4f')} / {fmt(r['two_step_block_mean_ms'], '.4f')}"
            f" | {r['fused_gain']:.3f}x | {fmt(r['fused_select_ms'], '.4f')} / "
            f"{fmt(r['two_step_select_ms'], '.4f')} | {100 * r['fused_select_share']:.1f} / "
            f"{100 * r['two_step_select_share']:.1f} % | {r['fused_speedup']:.2f}x / "
            f"{r['two_step_speedup']:.2f}x | {fmt(r['sdpa_per_call_ms'], '.4f')} |")
    lines += ["", "Configs:", ""]
    for r in rows:
        if "note" not in r:
            lines.append(f"- B{r['batch']} / {r['seq_len']}: gate_select {r['fused_config']} "
                         f"({r['fused_from']}); two-step {r['two_step_configs']}")
    path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--seq-len", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--two-step-gpu", default=None, metavar="SLUG",
                    help="run the two-step chain at the configs recorded for this GPU slug "
                         "(e.g. nvidia-h100-80gb-hbm3-sm90 on another GPU)")
    ap.add_argument("--out", default=None, help="results stem")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gate_select_ab.py needs a CUDA GPU")
    facts = gpu_facts()
    print(json.dumps(facts), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [bench_row(b, n, args.sparsity, gen, args.two_step_gpu) for b in args.batch
            for n in args.seq_len]
    stem = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        f"{facts['gpu_slug']}-gate-select-ab")
    save_results(stem, facts, rows, lambda path: write_markdown(rows, facts, path))


if __name__ == "__main__":
    main()
