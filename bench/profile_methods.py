"""Where a method's step spends its GPU time, kernel by kernel (torch.profiler).

    python bench/profile_methods.py                  # every part but quest-b16
    python bench/profile_methods.py --parts quest-b16 --batch 8
    python bench/profile_methods.py --parts gate milestone
    python bench/profile_methods.py --parts gate nsa --batch 8 --seq-len 32768

A development tool beside the benchmarks (bench/methods_*.py): it builds the same states with
their builders, runs a few plain steps under torch.profiler and prints, per part, each kernel's
summed CUDA time per step. Hq 32, Hkv 8, D 128, bf16. Parts: gate, quest (per head, block 64),
quest-b16 (per head, block 16; by name only), nsa (B 16, 128K, 90 % skipped unless --batch /
--seq-len say otherwise), entmax (decode, B 8, 128K, 90 %), milestone (B 8, 1K prefill, 2K
budget, 4K decoded), prefill (entmax forward + backward, 32K, 75 %). Writes the tables to
$OUT/profile-methods.txt when $OUT is set.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import methods_entmax_milestone as em  # noqa: E402
from bench import methods_gate_topk as gt  # noqa: E402
from bench.timing import require_cuda  # noqa: E402

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


def part_rule(name, gen, batch=16, seq_len=131072):
    _, rule, bs, topk = {r[0]: r for r in gt.RULES}[name]
    cache, dec, _ = gt.build(rule, bs, topk, batch, seq_len, 0.9, "contiguous", gen)
    attend, _ = gt.attention(bs, "contiguous")
    q, k, v, qn, kn = gt.step_inputs(batch, gen)
    step = gt.step_fn(dec, cache, attend, q, k, v, qn, kn, seq_len - 1)
    return kernel_table(step, title=f"{name} step, B{batch} {seq_len // 1024}K 0.9")


def part_entmax(gen):
    B, n = 8, 131072
    k, v, seq, summ, qs, c = em.entmax_decode_state(B, n, 0.9, gen)
    tau, att, _ = em.entmax_decode_kernels(c, B, n, 0.9)
    step = em.entmax_decode_step(tau, att, k, v, seq, summ, [n] * B)
    return kernel_table(lambda: step(qs[0]), title="entmax decode step, B8 128K 0.9")


def part_milestone(gen):
    B, prefill = 8, 1024
    cache, dec = em.milestone_state(B, prefill, 2048, 16384, gen)
    attend = em.paged_triton_attention(em.MILESTONE_PAGE)
    q = torch.randn(B, em.HQ, em.D, device="cuda", dtype=em.DT, generator=gen)
    kv = torch.randn(2, B, em.HKV, em.D, device="cuda", dtype=em.DT, generator=gen)
    for _ in range(4096):
        dec.step(q, kv[0], kv[1], cache, attend=attend)
    device_step = em.milestone_device_step(dec, cache, attend)
    out = kernel_table(lambda: device_step(q),
                       title="milestone device step (refresh + select + attend)")
    out += kernel_table(lambda: dec.step(q, kv[0], kv[1], cache, attend=attend),
                        title="milestone whole step (open/evict + append + minmax + device)")
    return out


def part_prefill(gen):
    from sparsegen.codegen.entmax_prefill import EntmaxPrefillTriton
    from sparsegen.methods.entmax import EntmaxRule

    kern = EntmaxPrefillTriton(em.ENTMAX_STATIC)
    q, k, v, w = em.prefill_inputs(32768, gen)
    rule = EntmaxRule(block_size=em.BLOCK, scale=52.0)  # ~75 % sparsity at 32K (bench)
    do = torch.randn(q.shape, device="cuda", dtype=em.DT, generator=gen)
    return kernel_table(em.prefill_fwd_bwd(kern, q, k, v, w, rule, do), steps=2,
                        title="entmax prefill fwd+bwd, 32K")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+",
                    default=["gate", "quest", "nsa", "entmax", "milestone", "prefill"])
    ap.add_argument("--batch", type=int, default=16, help="gate / quest / nsa parts")
    ap.add_argument("--seq-len", type=int, default=131072, help="gate / quest / nsa parts")
    args = ap.parse_args()
    require_cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    names = {"gate": "gate", "quest": "quest-ub-per-head-b64", "quest-b16": "quest-ub-per-head-b16",
             "nsa": "nsa-mean-shared-b64"}
    text = ""
    for part in args.parts:
        try:
            if part in names:
                text += part_rule(names[part], gen, args.batch, args.seq_len)
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
