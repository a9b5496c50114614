"""Where a method's step spends its GPU time, kernel by kernel (torch.profiler).

    python bench/profile_methods.py                  # every part
    python bench/profile_methods.py --parts gate milestone

A development tool beside the benchmarks (bench/methods_*.py): it builds the same states with
their builders, runs a few plain steps under torch.profiler and prints, per part, each kernel's
summed CUDA time per step. Hq 32, Hkv 8, D 128, bf16. Parts: gate, quest, nsa (B 16, 128K,
90 % skipped), entmax (decode, B 8, 128K, 90 %), milestone (B 8, 1K prefill, 2K budget, 4K
decoded), prefill (entmax forward + backward, 32K, 75 %). Writes the tables to
$OUT/profile-methods.txt when $OUT is set.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import methods_entmax_milestone as em  # noqa: E402
from bench import methods_gate_topk as gt  # noqa: E402
from sparsegen.codegen.backend import decode_backend  # noqa: E402
from sparsegen.codegen.decode_api import DecodeStatic  # noqa: E402

STEPS = 5


def kernel_table(fn, steps=STEPS, title=""):
    """Run fn `steps` times under the profiler; rows of (kernel, calls/step, us/step)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = e.cuda_time_total
        if t > 0:
            rows.append((e.key[:90], e.count / steps, t / steps))
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    lines = [f"## {title}: {total:.1f} us of kernels per step", "",
             "| kernel | calls/step | us/step |", "|---|---|---|"]
    lines += [f"| {k} | {c:g} | {t:.1f} |" for k, c, t in rows[:25]]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def part_rule(name, gen):
    spec = {r[0]: r for r in gt.RULES}[name]
    _, rule, bs, score, group = spec
    cache, dec = gt.build(rule, bs, score, group, 16, 131072, 0.9, "contiguous", gen)
    attend = decode_backend("triton")(DecodeStatic(bs, gt.D, gt.G, "bf16", "contiguous", 0))
    q, qn = (torch.randn(16, gt.HQ, gt.D, device="cuda", dtype=gt.DT, generator=gen)
             for _ in range(2))
    k, v, kn = (torch.randn(16, gt.HKV, gt.D, device="cuda", dtype=gt.DT, generator=gen)
                for _ in range(3))
    step = gt.step_fn(dec, cache, attend, q, k, v, qn, kn, 131071)
    return kernel_table(step, title=f"{name} step, B16 128K 0.9")


def part_entmax(gen):
    from sparsegen.codegen.entmax_kernels import EntmaxDecodeTriton, EntmaxStatic, EntmaxTauTriton

    B, n = 8, 131072
    k, v, seq, summ, qs, c = em.entmax_decode_state(B, n, 0.9, gen)
    q = qs[0]
    st = EntmaxStatic(em.BLOCK, em.D, em.G, "bf16")
    tau, att = EntmaxTauTriton(st, scale=c), EntmaxDecodeTriton(st)

    def step():
        s = tau(q, summ, seq, [n] * B)
        return att(q, k, v, s.indices, s.counts, seq, block_bias=s.bias)
    return kernel_table(step, title="entmax decode step, B8 128K 0.9")


def part_milestone(gen):
    from sparsegen.codegen.milestone_kernels import MilestoneScoreTriton, MilestoneStatic
    from sparsegen.methods.kv_cache import KVCache
    from sparsegen.methods.milestone import MilestoneDecoder, MilestoneRule

    B, P, prefill = 8, 16, 1024
    rule = MilestoneRule(page_size=P, block_size=P, budget_tokens=2048, refresh_fraction=0.5)
    pool = B * (math.ceil(prefill / P) + rule.budget_pages)
    cache = KVCache(B, em.HKV, em.D, 16384, dtype=em.DT, device="cuda", layout="paged",
                    page_size=P, num_pages=pool)
    attend = decode_backend("triton")(DecodeStatic(P, em.D, em.G, "bf16", "paged", P))
    dec = MilestoneDecoder(rule, em.HQ, em.HKV, em.D,
                           scorer=MilestoneScoreTriton(MilestoneStatic(em.D, em.G, "bf16")))
    k = torch.randn(B, prefill, em.HKV, em.D, device="cuda", dtype=em.DT, generator=gen)
    dec.prefill(cache, k, torch.randn_like(k))
    q = torch.randn(B, em.HQ, em.D, device="cuda", dtype=em.DT, generator=gen)
    kv = torch.randn(2, B, em.HKV, em.D, device="cuda", dtype=em.DT, generator=gen)
    for _ in range(4096):
        dec.step(q, kv[0], kv[1], cache, attend=attend)

    def device_step():
        dec._refresh(q, cache)
        i, c = dec.select(q, cache)
        return attend(q, cache.k, cache.v, i, c, cache.seq_lens, block_table=cache.block_table)
    out = kernel_table(device_step, title="milestone device step (refresh + select + attend)")
    out += kernel_table(lambda: dec.step(q, kv[0], kv[1], cache, attend=attend),
                        title="milestone whole step (open/evict + append + minmax + device)")
    return out


def part_prefill(gen):
    from sparsegen.codegen.entmax_kernels import EntmaxPrefillTriton, EntmaxStatic
    from sparsegen.methods.entmax import EntmaxRule, entmax_prefill

    kern = EntmaxPrefillTriton(EntmaxStatic(em.BLOCK, em.D, em.G, "bf16"))
    q, k, v, w = em.prefill_inputs(32768, gen)
    rule = EntmaxRule(block_size=em.BLOCK, scale=52.0)  # ~75 % sparsity at 32K (bench)
    do = torch.randn(q.shape, device="cuda", dtype=em.DT, generator=gen)

    def fwd_bwd():
        out, _ = entmax_prefill(q, k, v, w, rule, attention=kern.attention)
        out.backward(do)
    return kernel_table(fwd_bwd, steps=2, title="entmax prefill fwd+bwd, 32K")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+",
                    default=["gate", "quest", "nsa", "entmax", "milestone", "prefill"])
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    names = {"gate": "gate", "quest": "quest-ub-per-head-b64", "nsa": "nsa-mean-shared-b64"}
    text = ""
    for part in args.parts:
        try:
            if part in names:
                text += part_rule(names[part], gen)
            else:
                text += {"entmax": part_entmax, "milestone": part_milestone,
                         "prefill": part_prefill}[part](gen)
        except Exception as e:  # one part's failure must not hide the others
            text += f"## {part}: {type(e).__name__}: {e}\n"
            print(text.splitlines()[-1], flush=True)
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "profile-methods.txt").write_text(text)


if __name__ == "__main__":
    main()
