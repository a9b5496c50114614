"""H100 benchmark of the gate (SeerAttention-R) and topk (Quest / NSA) rules (issue 5).

    python bench/methods_gate_topk.py                 # every rule and shape
    python bench/methods_gate_topk.py --quick         # batch 16 at 128K

Every figure first checks the generated kernels against the plain-torch references, then times
(triton.testing.do_bench medians of CUDA events; plain calls and CUDA-graph replays; several
input sets rotated):
- the whole decode step (append K/V, update the rule's metadata, score, select, attend) vs
  dense cuDNN SDPA over the same cache (its fastest formulation, bench/baselines.py), at
  batch 8/16, 32K/128K, 90 % of blocks skipped (target: >= 7x), and the share of scoring +
  selection in the step (target: <= 10 %). Every kernel runs the config an emitted module
  runs where an example spec (TUNED_EXAMPLES) shares its statics, else its default. Where
  that block_select config is the TileLang one, the same steps are timed again with the
  Triton radix8 select (a same-run A/B of the selection kernel inside the step).
The gate distillation figures are bench/gate_distill.py's.
Hq 32, Hkv 8, D 128, bf16. Writes bench/results/<GPU>-step-gate-topk.{md,json} (and $OUT).
Quest per_head selects budget / G blocks per query head so that the union its KV head
attends stays within the budget (the table shows the blocks actually attended).

The scoring floor: the metadata a step reads is 1/block_size of the KV cache for Quest's
upper bound (min and max per block), 1/(2 block_size) for mean pooling and for the gate's
compression cache (d_gate = D); at 90 % sparsity the attention reads 1/10 of it, so the
scoring share cannot drop below (meta)/(meta + 0.1): 38 % for Quest at block 16, 13.5 % at
64 and 7.2 % at 128; 7.2 % for the gate and mean pooling at 64.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.baselines import fastest_cudnn_decode  # noqa: E402
from bench.block_select_probe import triton_only  # noqa: E402
from bench.emitted import emitted_attention, tuned_rule_configs  # noqa: E402
from bench.timing import (fmt, gpu_facts, note, rel_err, require_cuda, results_header,  # noqa: E402
                          save_results, time_graph, time_graph_per_call, time_plain,
                          GRAPH_CALLS)
from sparsegen.codegen.backend import decode_backend  # noqa: E402
from sparsegen.codegen.decode_api import DecodeStatic  # noqa: E402
from sparsegen.methods.decode_step import GateDecoder, TopkDecoder  # noqa: E402
from sparsegen.methods.gate import AttnGate  # noqa: E402
from sparsegen.methods.kv_cache import KVCache  # noqa: E402
from sparsegen.methods.sparse_decode_ref import sparse_decode_reference  # noqa: E402
from sparsegen.codegen.rule_kernels import rule_kernels  # noqa: E402
from sparsegen.spec import parse_spec  # noqa: E402

HQ, HKV, D = 32, 8, 128
G = HQ // HKV
DT = torch.bfloat16
ROTATE = 4
# example specs whose tuned rule-kernel configs a bench row runs when its statics are theirs
TUNED_EXAMPLES = ("seer-attention-r", "nsa-topk", "quest-topk", "quest-topk-b64")
PAGE_SIZE = 256  # of the paged caches `build` makes
# (name, rule, block size, the spec's topk section)
QUEST = {"score": "upper_bound", "group": "per_head"}
NSA = {"score": "mean_pooled", "group": "shared"}
RULES = [("gate", "gate", 64, None),
         ("quest-ub-per-head-b16", "topk", 16, QUEST),
         ("quest-ub-per-head-b64", "topk", 64, QUEST),
         ("nsa-mean-shared-b64", "topk", 64, NSA)]


def bench_spec(rule, bs, topk, seq_len, sparsity):
    """The spec of one bench row: Hq 32 / Hkv 8 / D 128 bf16, contiguous, a budget for
    `sparsity` of the blocks skipped. Quest per_head selects k blocks per query head and the
    KV head attends their union (up to G x k), so there k = budget / G."""
    share = (1 - sparsity) / (G if (topk or {}).get("group") == "per_head" else 1)
    budget = max(2, round(share * seq_len / bs)) * bs
    sel = {"rule": rule, "block_size": bs, "sink_blocks": 1, "local_blocks": 1,
           "budget_tokens": budget}
    if rule == "gate":
        sel["gate"] = {"d_gate": 128}
    else:
        sel["topk"] = topk
    return parse_spec(json.dumps({
        "name": "bench", "model": {"num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D,
                                   "dtype": "bf16", "num_layers": 1},
        "cache": {"layout": "contiguous"}, "selection": sel}), "bench")


def build(rule, bs, topk, batch, seq_len, sparsity, layout, gen, impl="triton"):
    """A cache of seq_len - 1 random tokens per sequence, its rule state filled by prefill,
    and the decoder (at the tuned rule-kernel configs where an example spec shares them).
    Returns (cache, decoder, {kernel: example spec whose tuned config it runs})."""
    cap = seq_len + 256  # room for the check loop's steps at any block size
    cache = KVCache(batch, HKV, D, cap, dtype=DT, device="cuda", layout=layout,
                    page_size=PAGE_SIZE if layout == "paged" else 0)
    n = seq_len - 1
    spec = bench_spec(rule, bs, topk, seq_len, sparsity)
    kernels = rule_kernels(spec)
    cfgs, source = tuned_rule_configs({name: static for name, _, static in kernels},
                                      TUNED_EXAMPLES, batch, seq_len,
                                      adapters={name: cls for name, cls, _ in kernels})
    if rule == "gate":
        gate = AttnGate.from_spec(spec).cuda()
        dec = GateDecoder.from_spec(spec, gate, batch, cap, device="cuda", impl=impl,
                                    kc_dtype=DT, kernel_configs=cfgs)
    else:
        dec = TopkDecoder.from_spec(spec, cache, impl=impl, kernel_configs=cfgs)
    chunk = 8192
    for b in range(batch):
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            k = torch.randn(1, m, HKV, D, device="cuda", dtype=DT, generator=gen)
            v = torch.randn(1, m, HKV, D, device="cuda", dtype=DT, generator=gen)
            start, stop = cache.extend(b, k[0], v[0])
            if rule == "gate":
                dec.state.extend(b, k[0] * 0.5, start)   # stand-in for the pre-RoPE keys
            else:
                dec.meta.fill(cache, b, start, stop)
    return cache, dec, source


def attention(bs, layout):
    """The attention over the caches `build` makes: the emitted module of an example spec
    with these attention statics (its nearest tuned bucket), else the Triton kernel's
    default config. Returns (attend, description)."""
    page = PAGE_SIZE if layout == "paged" else 0
    static = DecodeStatic(bs, D, G, "bf16", layout, page)
    return (emitted_attention(static, TUNED_EXAMPLES)
            or (decode_backend("triton")(static), "triton default"))


def step_inputs(batch, gen):
    """One step's random inputs: (q, k_new, v_new, q_nope, k_nope)."""
    q, qn = (torch.randn(batch, HQ, D, device="cuda", dtype=DT, generator=gen)
             for _ in range(2))
    k, v, kn = (torch.randn(batch, HKV, D, device="cuda", dtype=DT, generator=gen)
                for _ in range(3))
    return q, k, v, qn, kn


def step_fn(dec, cache, attend, q, k_new, v_new, qn, kn, n, steps=1):
    """`steps` decode steps from a cache reset to n tokens (capturable: the reset is a device
    fill, the rest never syncs). One step from n = seq_len - 1 is the block-filling step
    (the gate's costliest: it also projects the filled block into the compression cache);
    block_size steps from seq_len - block_size cover every position of a block once."""
    is_gate = isinstance(dec, GateDecoder)

    def run():
        cache.lengths = [n] * cache.batch
        cache.seq_lens.fill_(n)
        for _ in range(steps):
            if is_gate:
                out = dec.step(q, k_new, v_new, cache, attend, q_nope=qn, k_nope=kn)
            else:
                out = dec.step(q, k_new, v_new, cache, attend)
        return out
    return run


@contextlib.contextmanager
def fixed_selection(dec, idx, cnt):
    """Within: dec's steps attend the precomputed (idx, cnt) instead of scoring and
    selecting (everything else in the step unchanged)."""
    dec.select = lambda *args, **kwargs: (idx, cnt)
    try:
        yield
    finally:
        del dec.select


@contextlib.contextmanager
def block_select_config(dec, config: dict):
    """Within: dec's rule kernels are rebuilt with block_select at `config` (the others at
    their configs); as before after."""
    saved = dec._kernel_configs, dec._kernels
    dec._kernel_configs, dec._kernels = {**saved[0], "block_select": config}, None
    try:
        yield
    finally:
        dec._kernel_configs, dec._kernels = saved


def block_select_in_use(dec, cache) -> dict:
    """The block_select config dec's kernels run (tuned bucket or default)."""
    kernels = dec.kernels if isinstance(dec, GateDecoder) else dec.kernels(cache)[1]
    return kernels.select.config


def select_fn(dec, cache, q, qn):
    is_gate = isinstance(dec, GateDecoder)
    return (lambda: dec.select(qn, cache)) if is_gate else (lambda: dec.select(q, cache))


def _overlap(sel_a, sel_b):
    """(blocks both selections hold, blocks sel_b holds), summed over sequences and KV
    heads; a selection is (indices, counts)."""
    both = total = 0
    for b in range(sel_a[0].shape[0]):
        for h in range(HKV):
            a = set(sel_a[0][b, h, : sel_a[1][b, h]].tolist())
            w = set(sel_b[0][b, h, : sel_b[1][b, h]].tolist())
            both += len(a & w)
            total += len(w)
    return both, total


def check_rule(name, rule, bs, topk, layout, gen, rows):
    """Kernels vs references at a small shape: selection agreement over steps, outputs."""
    row = {"part": "check", "rule": name, "layout": layout}
    try:
        cache, dec, _ = build(rule, bs, topk, 2, 8192 + 37, 0.9, layout, gen)
        attend, _ = attention(bs, layout)
        agree = total = 0
        worst = 0.0
        for _ in range(20):
            q, k, v, qn, kn = step_inputs(2, gen)
            if rule == "gate":
                out = dec.step(q, k, v, cache, attend, q_nope=qn, k_nope=kn)
                want = dec.select(qn, cache, impl="torch")
                got = dec.select(qn, cache, impl="triton")
            else:
                # the kernel path updated the metadata; the reference reads the same tensors
                out = dec.step(q, k, v, cache, attend)
                want = dec.select(q, cache, impl="torch")
                got = dec.select(q, cache, impl="triton")
            n_agree, n_want = _overlap(got, want)
            agree, total = agree + n_agree, total + n_want
            ref = sparse_decode_reference(q, cache.k, cache.v, got[0], got[1], cache.seq_lens,
                                          bs, block_table=cache.block_table, validate=True)
            worst = max(worst, rel_err(out, ref))
        row["selection_agreement"] = agree / max(1, total)
        row["out_rel_err"] = worst
        row["ok"] = bool(row["selection_agreement"] >= 0.999 and worst < 2e-2)
    except Exception as e:  # a failure is a result, not the end of the run
        note(row, "check_note", e)
        row["ok"] = False
    rows.append(row)
    print(json.dumps(row), flush=True)
    return row.get("ok", False)


def bench_step(name, rule, bs, topk, batch, seq_len, sparsity, layout, gen, rows):
    row = {"part": "step", "rule": name, "layout": layout, "batch": batch, "seq_len": seq_len,
           "sparsity": sparsity, "block_size": bs}
    try:
        cache, dec, source = build(rule, bs, topk, batch, seq_len, sparsity, layout, gen)
        row["tuned_from"] = source
        attend, row["attention"] = attention(bs, layout)
        n = seq_len - 1
        sets = [step_inputs(batch, gen) for _ in range(ROTATE)]
        steps = [step_fn(dec, cache, attend, *s[:3], s[3], s[4], n) for s in sets]
        steps[0]()
        idx, cnt = select_fn(dec, cache, sets[0][0], sets[0][3])()
        row["selected_blocks_mean"] = cnt.float().mean().item()
        row["blocks"] = -(-seq_len // bs)
        row["step_ms"] = time_plain(steps)
        row["step_graph_ms"] = time_graph(steps)
        blocks = [step_fn(dec, cache, attend, *s[:3], s[3], s[4], seq_len - bs, steps=bs)
                  for s in sets]
        row["block_mean_step_graph_ms"] = time_graph(blocks) / bs
        if rule == "gate":  # the same steps, the compression-cache update on a side stream / serial
            default = dec.overlap_append
            for overlap, key in ((True, "side"), (False, "serial")):
                dec.overlap_append = overlap
                row[f"{key}_step_graph_ms"] = time_graph(steps)
                row[f"{key}_block_mean_step_graph_ms"] = time_graph(blocks) / bs
            dec.overlap_append = default
        sels = [select_fn(dec, cache, s[0], s[3]) for s in sets]
        row["select_graph_ms"] = time_graph(sels)
        row["block_select_config"] = config = block_select_in_use(dec, cache)
        if config["algo"] == "tilelang":   # the same steps with the Triton select, same run
            with block_select_config(dec, triton_only(config)):
                row["triton_select_step_graph_ms"] = time_graph(steps)
                row["triton_select_block_mean_step_graph_ms"] = time_graph(blocks) / bs
                row["triton_select_graph_ms"] = time_graph(sels)
        # the share is what the step loses to scoring + selection: the same steps with the
        # selection fixed in advance, timed the same way (L2 holds what the real step
        # sequence leaves in it, not a loop of selections re-reading their metadata)
        with fixed_selection(dec, idx, cnt):
            row["nosel_step_graph_ms"] = time_graph(steps)
            row["nosel_block_mean_step_graph_ms"] = time_graph(blocks) / bs
        row["select_share"] = 1 - row["nosel_step_graph_ms"] / row["step_graph_ms"]
        row["select_share_block_mean"] = (1 - row["nosel_block_mean_step_graph_ms"]
                                          / row["block_mean_step_graph_ms"])
        if layout == "contiguous":
            row["sdpa_variant"], dense, row["sdpa_graph_ms"] = fastest_cudnn_decode(
                [s[0] for s in sets], cache.k[:, :seq_len], cache.v[:, :seq_len], time_graph)
            row["sdpa_ms"] = time_plain(dense)
            row["speedup"] = row["sdpa_graph_ms"] / row["step_graph_ms"]
            # the block mean amortizes the graph's launch over block_size steps: so must the
            # baseline it is compared with
            row["sdpa_mean_graph_ms"] = time_graph_per_call(dense)
            row["speedup_block_mean"] = (row["sdpa_mean_graph_ms"]
                                         / row["block_mean_step_graph_ms"])
        meta = sum(t.numel() * t.element_size() for t in
                   (dec.meta.tensors() if rule == "topk" else (dec.state.kc,)))
        kv = 2 * cache.k.numel() * cache.k.element_size()
        row["meta_share_of_kv"] = meta / kv
        row["scoring_floor_share"] = (meta / kv) / (meta / kv + (1 - sparsity))
    except Exception as e:
        note(row, "step_note", e)
    torch.cuda.empty_cache()
    rows.append(row)
    print(json.dumps(row), flush=True)


def write_markdown(rows, facts, path):
    lines = [*results_header("gate / topk decode step", facts),
             f"- Hq {HQ}, Hkv {HKV}, D {D}, bf16; medians in ms; `graph` = CUDA-graph replay",
             "- step = append K/V + metadata update + scoring + selection + sparse attention; "
             "each kernel runs the config the emitted module of an example spec with the same "
             "statics runs (its nearest tuned bucket), named under the table, else its default",
             "- `fill step`: the step whose token fills a block (the gate also projects the "
             "block into its compression cache then); `block mean`: the mean step over a "
             "block's positions (block_size consecutive steps in one graph / block_size), what "
             "a decode sees per token",
             "- like is timed against like: a CUDA graph's replay costs ~10-15 us of its own, "
             f"so the fill step is compared with one call of dense cuDNN SDPA in one graph, the "
             f"block mean with dense per call of graphs of {GRAPH_CALLS} calls",
             "- speedup = cuDNN SDPA time / step time (target >= 7x); select share = what the "
             "step loses to scoring + selection, 1 - (the same steps attending a selection "
             "fixed in advance) / step (target <= 10 %); `select ms` = scoring + selection "
             "alone, one call per graph (launch included); floor = metadata bytes / (metadata "
             "+ selected KV bytes)", ""]
    checks = [r for r in rows if r["part"] == "check"]
    if checks:
        lines += ["## Kernel checks (before timing)", "",
                  "| rule | layout | selection agreement | output rel err | ok |",
                  "|---|---|---|---|---|"]
        for r in checks:
            agree = fmt(r.get("selection_agreement"), ".4f")
            lines.append(f"| {r['rule']} | {r['layout']} | {agree}"
                         f" | {fmt(r.get('out_rel_err'), '.2e')} | {r.get('ok')} "
                         f"{r.get('check_note', '')} |")
        lines.append("")
    steps = [r for r in rows if r["part"] == "step"]
    if steps:
        lines += ["## Decode step vs dense cuDNN SDPA", "",
                  "| rule | layout | B | len | blocks sel / total | fill step ms (graph) | "
                  "block mean (graph) | select ms (graph) | select share fill / mean | floor | "
                  f"cuDNN ms (graph / per call of {GRAPH_CALLS}) | speedup fill / mean |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in steps:
            if "step_ms" not in r:
                lines.append(f"| {r['rule']} | {r['layout']} | {r['batch']} | {r['seq_len']} | "
                             f"{r.get('step_note', '-')} | | | | | | | |")
                continue
            lines.append(
                f"| {r['rule']} | {r['layout']} | {r['batch']} | {r['seq_len']} | "
                f"{r['selected_blocks_mean']:.0f} / {r['blocks']} | {r['step_ms']:.4f} "
                f"({r['step_graph_ms']:.4f}) | {r['block_mean_step_graph_ms']:.4f} | "
                f"{r['select_graph_ms']:.4f} | {100 * r['select_share']:.1f} / "
                f"{100 * r['select_share_block_mean']:.1f} % | "
                f"{100 * r['scoring_floor_share']:.1f} % | "
                f"{fmt(r.get('sdpa_ms'), '.4f')} ({fmt(r.get('sdpa_graph_ms'), '.4f')} / "
                f"{fmt(r.get('sdpa_mean_graph_ms'), '.4f')}) | "
                f"{fmt(r.get('speedup'), '.2f')}x / {fmt(r.get('speedup_block_mean'), '.2f')}x |")
        lines.append("")
        serial = [r for r in steps if "serial_step_graph_ms" in r and "sdpa_mean_graph_ms" in r]
        if serial:
            lines += ["### gate: compression-cache update on a side stream vs serial "
                      "(same steps, same run; the decoder's default is the side stream)", "",
                      "| B | len | fill step ms side / serial | block mean ms side / serial | "
                      "speedup mean side / serial |", "|---|---|---|---|---|"]
            for r in serial:
                lines.append(
                    f"| {r['batch']} | {r['seq_len']} | {r['side_step_graph_ms']:.4f} / "
                    f"{r['serial_step_graph_ms']:.4f} | "
                    f"{r['side_block_mean_step_graph_ms']:.4f} / "
                    f"{r['serial_block_mean_step_graph_ms']:.4f} | "
                    f"{r['sdpa_mean_graph_ms'] / r['side_block_mean_step_graph_ms']:.2f}x / "
                    f"{r['sdpa_mean_graph_ms'] / r['serial_block_mean_step_graph_ms']:.2f}x |")
            lines.append("")
        ab = [r for r in steps if "triton_select_step_graph_ms" in r and "sdpa_mean_graph_ms" in r]
        if ab:
            lines += ["### block_select in TileLang vs the Triton radix8 (same steps, same run; "
                      "the step runs TileLang)", "",
                      "| rule | B | len | select ms TileLang / Triton | fill step ms TileLang / "
                      "Triton | block mean ms TileLang / Triton | speedup mean TileLang / "
                      "Triton |", "|---|---|---|---|---|---|---|"]
            for r in ab:
                lines.append(
                    f"| {r['rule']} | {r['batch']} | {r['seq_len']} | "
                    f"{r['select_graph_ms']:.4f} / {r['triton_select_graph_ms']:.4f} | "
                    f"{r['step_graph_ms']:.4f} / {r['triton_select_step_graph_ms']:.4f} | "
                    f"{r['block_mean_step_graph_ms']:.4f} / "
                    f"{r['triton_select_block_mean_step_graph_ms']:.4f} | "
                    f"{r['speedup_block_mean']:.2f}x / "
                    f"{r['sdpa_mean_graph_ms'] / r['triton_select_block_mean_step_graph_ms']:.2f}x |")
            lines.append("")
        tuned = sorted({(r["rule"], k, v) for r in steps for k, v in r.get("tuned_from", {}).items()})
        attn = sorted({(r["rule"], r.get("attention", "-")) for r in steps})
        lines += ["Attention: " + "; ".join(f"{rule}: {a}" for rule, a in attn), ""]
        lines += ["Tuned rule-kernel configs: " + ("; ".join(
            f"{rule} {k} from {v}" for rule, k, v in tuned) or "none (defaults)"), ""]
    path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", nargs="+", default=[r[0] for r in RULES])
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--seq-len", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--layouts", nargs="+", default=["contiguous"])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--quick", action="store_true", help="batch 16 at 128K")
    ap.add_argument("--out", default=None, help="results stem")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq_len = [16], [131072]
    require_cuda()
    facts = gpu_facts()
    print(json.dumps(facts), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    stem = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        f"{facts['gpu_slug']}-step-gate-topk")

    def save(echo=False):  # after every row: a run cut off by its time limit keeps what it timed
        save_results(stem, facts, rows, lambda path: write_markdown(rows, facts, path), echo)

    # never time a kernel that failed its check; then shape by shape, so that the rules are
    # timed side by side at each shape even in a run cut off early
    passed = [(r, layout) for r in RULES if r[0] in args.rules for layout in args.layouts
              if check_rule(*r, layout, gen, rows)]
    save()
    for batch in args.batch:
        for seq_len in args.seq_len:
            for (name, rule, bs, topk), layout in passed:
                bench_step(name, rule, bs, topk, batch, seq_len, args.sparsity, layout, gen,
                           rows)
                save()
    save(echo=True)

if __name__ == "__main__":
    main()
