"""Entmax (DashAttention) prefill at 32K tokens, 75 % of the causal blocks skipped, on one GPU:

    python bench/entmax_prefill_probe.py         # B 1, Hq 32 / Hkv 8 / D 128, block 64, bf16

1. block level (selection: summaries, scores, entmax, mask/bias, index lists) forward and
   forward + backward: the torch path as it was (fp32 copies of q and k, torch entmax,
   sorted lists through mask_to_indices) against the Triton block ops (EntmaxPoolTriton,
   sort-free lists), after checking they give the same mask and close bias / gradients;
   the block ops' config variants;
2. the three token-level kernels (forward; dq, which also forms DELTA; dk/dv), each timed
   alone over tile / head-pack / warp / stage variants on one selection, checked against
   the default config's outputs; the fastest of each part make the "best" config;
3. the whole entmax_prefill forward + backward (Triton block ops + kernels, at the default
   and the best config; and with the torch block level) against dense SDPA flash / cuDNN
   forward + backward, outputs and gradients checked first (2K against the fp32 torch path;
   32K between the block levels).
Medians of plain calls (autograd in the loop: no CUDA graphs), fresh random inputs.
Writes bench/results/<GPU>-entmax-prefill-probe.{md,json}.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import methods_entmax_milestone as em
from bench.baselines import dense_prefill_fwd_bwd
from bench.timing import (fmt, gpu_facts, note, rel_err, require_cuda, results_header,
                          save_results, time_plain)
from sparsegen.codegen.entmax_kernels import EntmaxStatic
from sparsegen.codegen.entmax_prefill import EntmaxPrefillTriton
from sparsegen.codegen.entmax_pool import EntmaxPoolTriton
from sparsegen.methods.entmax import EntmaxRule, entmax_prefill, prefill_selection
from sparsegen.methods.selection import mask_to_indices

T = 32768
SCALE = 52.0   # ~75 % of the causal blocks skipped at 32K (the bench's bisection: 51.9)
# token-level variants, each part timed alone; pack = query heads stacked in a tile (the GQA
# group shares the selection: one K/V tile serves them all), so rows = tokens * pack
FWD = [(64, 64, 1, 4, 3), (64, 64, 4, 8, 3), (64, 64, 4, 8, 2), (64, 64, 2, 8, 3),
       (32, 64, 4, 8, 3), (64, 64, 4, 8, 4), (64, 32, 4, 8, 3)]
#                                              block_m, block_n, pack, warps, stages
DQ = [(64, 64, 1, 4, 2), (32, 64, 4, 8, 3), (64, 64, 2, 8, 3), (64, 64, 2, 8, 4),
      (32, 64, 4, 8, 4)]                       # dq_m, dq_n, dq_pack, bwd_warps, bwd_stages
# kv_qrows 1: the dk/dv matmuls take the query columns as M (dk^T, dv^T accumulated)
KV = [(64, 64, 1, 4, 2, 0), (64, 64, 1, 4, 2, 1), (32, 64, 4, 8, 2, 1), (64, 64, 4, 8, 1, 1),
      (32, 64, 2, 4, 2, 1), (16, 64, 4, 4, 2, 1), (64, 64, 2, 8, 2, 1), (16, 64, 4, 4, 3, 1),
      (64, 64, 1, 4, 3, 1), (32, 64, 2, 4, 3, 1)]
#                                    kv_m, kv_n, kv_pack, kv_warps, kv_stages, kv_qrows
PART_KEYS = {"fwd": ("block_m", "block_n", "pack", "num_warps", "num_stages"),
             "dq": ("dq_m", "dq_n", "dq_pack", "bwd_warps", "bwd_stages"),
             "kv": ("kv_m", "kv_n", "kv_pack", "kv_warps", "kv_stages", "kv_qrows")}
# the kernels' first defaults: one query head per tile, 4 warps, dk/dv over key rows
ONE_HEAD = {"block_m": 64, "block_n": 64, "pack": 1, "num_warps": 4, "num_stages": 3,
            "dq_m": 64, "dq_n": 64, "dq_pack": 1, "bwd_warps": 4, "bwd_stages": 2,
            "kv_m": 64, "kv_n": 64, "kv_pack": 1, "kv_warps": 4, "kv_stages": 2, "kv_qrows": 0,
            "idx_ptx": 1}
POOL = [(512, 4, 8), (256, 4, 8), (1024, 8, 8), (512, 4, 4), (512, 8, 8)]  # chunk, warps, pool


def old_selection(q, k, w, rule):
    """The block level as it was before the Triton block ops: fp32 copies of q and k, the
    torch entmax, mask_to_indices (sorts) for both lists."""
    sel = prefill_selection(q.float(), k.float(), w, rule, block_ops=None)
    B, H, nq, nk = sel.mask.shape
    fi, fc = mask_to_indices(sel.mask.reshape(B, H * nq, nk), nk)
    ri, rc = mask_to_indices(sel.mask.transpose(-1, -2).reshape(B, H * nk, nq), nq)
    return sel, (fi.view(B, H, nq, nk), fc.view(B, H, nq), ri.view(B, H, nk, nq),
                 rc.view(B, H, nk))


def new_selection(q, k, w, rule, ops):
    sel = prefill_selection(q, k, w, rule, block_ops=ops)
    return sel, sel.lists()


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def block_level(rows, q, k, w, rule, st, gen):
    """Check, then time old vs new block level, forward and forward + backward."""
    ops = EntmaxPoolTriton(st)
    # upstream gradient on the group-averaged probabilities: through the bias (log p) a
    # random gradient is scaled by 1/p, so fp32 rounding of the tiniest supported p would
    # dominate the comparison; the whole-prefill check below covers the bias path
    dpbar = torch.randn(1, em.HKV, T // em.BLOCK, T // em.BLOCK, device="cuda", generator=gen)
    paths = (("old", lambda a, b, c: old_selection(a, b, c, rule)),
             ("new", lambda a, b, c: new_selection(a, b, c, rule, ops)))
    res = {}
    for name, fn in paths:
        a, b, c = leaves(q, k, w)
        sel, lists = fn(a, b, c)
        (sel.pbar * dpbar).sum().backward()
        res[name] = (sel, lists, [a.grad, b.grad, c.grad])
    (so, lo, go), (sn, ln, gn) = res["old"], res["new"]
    row = {"part": "block_level", "mask_equal": bool(torch.equal(so.mask, sn.mask)),
           "mask_diff_frac": (so.mask != sn.mask).float().mean().item(),
           "lists_equal": all(torch.equal(x, y) for x, y in zip(lo, ln)),
           "bias_err": rel_err(sn.bias, so.bias), "pbar_err": rel_err(sn.pbar, so.pbar),
           "grad_err": {n: rel_err(x, y) for n, x, y in zip("qkw", gn, go)},
           "sparsity": em.prefill_sparsity(sn)}
    ok = row["mask_diff_frac"] < 1e-4 and row["bias_err"] < 1e-3 and \
        max(row["grad_err"].values()) < 2e-2
    row["ok"] = ok
    if ok:
        def timed(fn, backward):
            a, b, c = leaves(q, k, w)

            def call():
                if backward:
                    sel, _ = fn(a, b, c)
                    (sel.pbar * dpbar).sum().backward()
                else:
                    with torch.no_grad():
                        fn(a, b, c)
            return time_plain([call], warmup_ms=100, rep_ms=500)
        for name, fn in paths:
            row[f"{name}_fwd_ms"] = timed(fn, False)
            row[f"{name}_fwd_bwd_ms"] = timed(fn, True)
    else:
        row["note"] = "WRONG: Triton block level differs from the torch one"
    print(row, flush=True)
    rows.append(row)
    for chunk, nw, pw in POOL:  # block ops config variants (forward + backward)
        cfg = {"chunk": chunk, "num_warps": nw, "pool_warps": pw}
        r = {"part": "block_ops", "config": cfg}
        try:
            kern = EntmaxPoolTriton(st, cfg)
            a, b, c = leaves(q, k, w)
            sel, _ = new_selection(a, b, c, rule, kern)
            (sel.pbar * dpbar).sum().backward()
            r["err"] = max([rel_err(sel.bias, sn.bias)]
                           + [rel_err(x.grad, y) for x, y in zip((a, b, c), gn)])
            if r["err"] < 1e-3:
                def call(a=a, b=b, c=c, kern=kern):
                    s2, _ = new_selection(a, b, c, rule, kern)
                    (s2.pbar * dpbar).sum().backward()
                r["ms"] = time_plain([call], warmup_ms=100, rep_ms=500)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile or run is a result
            r["note"] = f"{type(e).__name__}: {str(e)[:160]}"
        print(r, flush=True)
        rows.append(r)
    return sn


def kernel_configs(rows, q, k, v, sel, st, gen) -> dict:
    """Time each token-level kernel alone over its variants; returns the default config
    with each part's fastest correct variant."""
    idx, cnt, ridx, rcnt = sel.lists()
    bias = sel.bias.detach().float().contiguous()
    do = torch.randn(q.shape, device="cuda", dtype=em.DT, generator=gen)
    scale = em.D ** -0.5
    base_cfg = EntmaxPrefillTriton.default_config(st)
    base = EntmaxPrefillTriton(st)
    o_ref, lse_ref = base.forward(q, k, v, bias, idx, cnt, scale)
    dq_ref = base.backward_dq(q, k, v, bias, idx, cnt, o_ref, lse_ref, do, scale)
    kv_ref = base.backward_dkdv(q, k, v, bias, ridx, rcnt, do, lse_ref, dq_ref[2], scale)
    calls = {  # part -> (run(kern), reference outputs)
        "fwd": (lambda kern: kern.forward(q, k, v, bias, idx, cnt, scale), (o_ref, lse_ref)),
        "dq": (lambda kern: kern.backward_dq(q, k, v, bias, idx, cnt, o_ref, lse_ref, do,
                                             scale), dq_ref),
        "kv": (lambda kern: kern.backward_dkdv(q, k, v, bias, ridx, rcnt, do, lse_ref,
                                               dq_ref[2], scale), kv_ref)}
    best = {}
    for part, variants in (("fwd", FWD), ("dq", DQ), ("kv", KV)):
        run, ref = calls[part]
        for values in variants:
            cfg = {**base_cfg, **dict(zip(PART_KEYS[part], values))}
            row = {"part": part, "config": cfg}
            try:
                bad = EntmaxPrefillTriton.check_config(st, cfg)
                if bad:
                    raise ValueError(bad)
                kern = EntmaxPrefillTriton(st, cfg)
                row["err"] = max(rel_err(a, b) for a, b in zip(run(kern), ref))
                if row["err"] < 2e-2:
                    row["ms"] = time_plain([lambda kern=kern: run(kern)], warmup_ms=100,
                                           rep_ms=600)
                    if row["ms"] < best.get(part, (math.inf,))[0]:
                        best[part] = (row["ms"], values)
            except Exception as e:  # noqa: BLE001 - a config that fails to compile or run is a result
                row["note"] = f"{type(e).__name__}: {str(e)[:160]}"
            print(row, flush=True)
            rows.append(row)
    out = dict(base_cfg)
    for part, (_, values) in best.items():
        out.update(zip(PART_KEYS[part], values))
    return out


def whole(rows, rule, st, gen, config=None, label="default", baselines=True):
    """entmax_prefill fwd + bwd (Triton block ops) at one kernel config; with baselines, also
    with the torch block level and dense SDPA (returns the best dense fwd + bwd ms)."""
    kern = EntmaxPrefillTriton(st, config)
    row = {"part": "whole", "label": label, "config": kern.config, "seq_len": T,
           "scale": rule.scale}
    rows.append(row)
    try:
        # 2K: ours (bf16, Triton block ops + kernels) vs the fp32 torch path on the same values
        row["check_2k_err"] = em.check_prefill_2k(kern, gen)
        q, k, v, w = em.prefill_inputs(T, gen)
        do = torch.randn(q.shape, device="cuda", dtype=em.DT, generator=gen)
        # 32K: the two block levels under the same kernels, outputs and gradients
        outs = []
        for ops in ("auto", None):
            a, b, c, ww = leaves(q, k, v, w)
            out, sel = entmax_prefill(a, b, c, ww, rule, attention=kern.attention,
                                      block_ops=ops)
            out.backward(do)
            outs.append([out.detach(), a.grad, b.grad, c.grad])
        row["check_32k_err"] = max(rel_err(x, y) for x, y in zip(*outs))
        row["sparsity"] = em.prefill_sparsity(sel)
        if not (row["check_2k_err"] < 3e-2 and row["check_32k_err"] < 2e-2):
            row["note"] = "WRONG prefill vs torch path"
            return
        a, b, c, ww = leaves(q, k, v, w)
        paths = [("ours", "auto")] + ([("torch_block", None)] if baselines else [])
        for name, ops in paths:
            def fwd(ops=ops):
                with torch.no_grad():
                    entmax_prefill(a, b, c, ww, rule, attention=kern.attention, block_ops=ops)
            row[f"{name}_fwd_bwd_ms"] = time_plain(
                [em.prefill_fwd_bwd(kern, a, b, c, ww, rule, do, block_ops=ops)],
                warmup_ms=200, rep_ms=1000)
            row[f"{name}_fwd_ms"] = time_plain([fwd], warmup_ms=100, rep_ms=500)
        dense_ms = dense_prefill_fwd_bwd(q, k, v, do, row, time_plain) if baselines else None
        if dense_ms:
            row["speedup_vs_best_dense"] = dense_ms / row["ours_fwd_bwd_ms"]
        return dense_ms
    except Exception as e:  # noqa: BLE001 - recorded in the row; the table still gets written
        note(row, "note", e)
    finally:
        print(row, flush=True)


def profile(rule, st, config, path):
    """One entmax_prefill forward + backward under torch.profiler: GPU time per kernel."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    kern = EntmaxPrefillTriton(st, config)
    q, k, v, w = leaves(*em.prefill_inputs(T, gen))
    do = torch.randn(q.shape, device="cuda", dtype=em.DT, generator=gen)

    def step():
        out, _ = entmax_prefill(q, k, v, w, rule, attention=kern.attention)
        out.backward(do)
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    Path(path).write_text(f"# entmax_prefill fwd + bwd at {T} tokens, config {kern.config}\n\n"
                          f"```\n{table}\n```\n")
    print(table, flush=True)


def write_md(path, rows, facts, base_cfg):
    L = [*results_header("entmax prefill", facts),
         (f"- T {T}, B 1, Hq {em.HQ}, Hkv {em.HKV}, D {em.D}, block {em.BLOCK}, bf16, scale "
         f"{SCALE}; kernel default config {base_cfg}"), ""]
    for r in rows:
        if r["part"] == "block_level":
            L += ["## block level (selection + index lists), forward and forward + backward", "",
                  (f"- checks: mask equal {r['mask_equal']} (differing fraction "
                  f"{r['mask_diff_frac']:.1e}), lists equal {r['lists_equal']}, bias rel err "
                  f"{r['bias_err']:.1e}, pbar {r['pbar_err']:.1e}, grads {r['grad_err']}; "
                  f"sparsity {r['sparsity']:.3f} {r.get('note', '')}"), "",
                  "| path | fwd ms | fwd+bwd ms |", "|---|---|---|",
                  (f"| torch (fp32 copies, sorts) | {fmt(r.get('old_fwd_ms'), '.3f')} | "
                  f"{fmt(r.get('old_fwd_bwd_ms'), '.3f')} |"),
                  (f"| Triton block ops + compaction | {fmt(r.get('new_fwd_ms'), '.3f')} | "
                  f"{fmt(r.get('new_fwd_bwd_ms'), '.3f')} |"), "",
                  "| block ops config (chunk, warps, pool warps) | fwd+bwd ms | err | note |",
                  "|---|---|---|---|"]
        elif r["part"] == "block_ops":
            c = r["config"]
            L.append(f"| {c['chunk']}, {c['num_warps']}, {c['pool_warps']} | "
                     f"{fmt(r.get('ms'), '.3f')} | {fmt(r.get('err'), '.1e')} | "
                     f"{r.get('note', '')} |")
    L += ["", "## token-level kernels, each timed alone (one selection, no autograd)", "",
          "pack = query heads stacked in one tile (rows = tokens x pack); the dq kernel also",
          "forms DELTA = rowsum(o * do).", "",
          "| part | tokens x keys | pack | warps / stages | kv_qrows | ms | rel err vs default | note |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] not in PART_KEYS:
            continue
        m, n, pack, warps, stages = (r["config"][key] for key in PART_KEYS[r["part"]][:5])
        qrows = r["config"]["kv_qrows"] if r["part"] == "kv" else "-"
        L.append(f"| {r['part']} | {m} x {n} | {pack} | {warps} / {stages} | {qrows} | "
                 f"{fmt(r.get('ms'), '.2f')} | {fmt(r.get('err'), '.1e')} | {r.get('note', '')} |")
    wholes = [r for r in rows if r["part"] == "whole"]
    if wholes:
        r0 = wholes[0]
        L += ["", "## entmax_prefill forward + backward vs dense SDPA (causal)", ""]
        for r in wholes:
            L.append(f"- {r['label']} config {r['config']}: checks 2K vs fp32 torch path "
                     f"{fmt(r.get('check_2k_err'), '.1e')}, 32K Triton vs torch block level "
                     f"{fmt(r.get('check_32k_err'), '.1e')}; sparsity "
                     f"{fmt(r.get('sparsity'), '.3f')} {r.get('note', '')}")
        L += ["", "| what | fwd ms | fwd+bwd ms | speedup vs best dense (>= 2) |",
              "|---|---|---|---|"]
        for r in wholes:
            L.append(f"| ours (Triton block ops), {r['label']} config | "
                     f"{fmt(r.get('ours_fwd_ms'), '.2f')} | "
                     f"{fmt(r.get('ours_fwd_bwd_ms'), '.2f')} | "
                     f"{fmt(r.get('speedup_vs_best_dense'), '.2f')} |")
        L += [f"| ours with the torch block level, {r0['label']} config | "
              f"{fmt(r0.get('torch_block_fwd_ms'), '.2f')} | "
              f"{fmt(r0.get('torch_block_fwd_bwd_ms'), '.2f')} | |",
              f"| dense flash | - | {fmt(r0.get('flash_fwd_bwd_ms'), '.2f')} | |",
              f"| dense cuDNN | - | {fmt(r0.get('cudnn_fwd_bwd_ms'), '.2f')} | |"]
    Path(path).write_text("\n".join(L) + "\n")


def main():
    if "--profile" in sys.argv:   # diagnosis only: the default config's kernels, one call
        st = EntmaxStatic(em.BLOCK, em.D, em.G, "bf16")
        facts = gpu_facts()
        profile(EntmaxRule(block_size=em.BLOCK, scale=SCALE), st, None,
                ROOT / "bench" / "results" / f"{facts['gpu_slug']}-entmax-prefill-profile.md")
        return
    facts = gpu_facts()
    gen = torch.Generator(device="cuda").manual_seed(0)
    st = EntmaxStatic(em.BLOCK, em.D, em.G, "bf16")
    rule = EntmaxRule(block_size=em.BLOCK, scale=SCALE)
    rows = []
    q, k, v, w = (t.detach() for t in em.prefill_inputs(T, gen))
    sel = block_level(rows, q, k, w, rule, st, gen)
    best = kernel_configs(rows, q, k, v, sel, st, gen)
    del q, k, v, w, sel
    torch.cuda.empty_cache()
    dense_ms = whole(rows, rule, st, gen)
    others = [(ONE_HEAD, "one head per tile, key rows (the first kernels)")]
    if best != EntmaxPrefillTriton.default_config(st):
        others.append((best, "best of the sweep"))
    for config, label in others:
        whole(rows, rule, st, gen, config, label, baselines=False)
        if dense_ms and rows[-1].get("ours_fwd_bwd_ms"):
            rows[-1]["speedup_vs_best_dense"] = dense_ms / rows[-1]["ours_fwd_bwd_ms"]
    stem = ROOT / "bench" / "results" / f"{facts['gpu_slug']}-entmax-prefill-probe"
    save_results(stem, facts, rows,
                 lambda p: write_md(p, rows, facts, EntmaxPrefillTriton.default_config(st)))


if __name__ == "__main__":
    require_cuda()
    main()
