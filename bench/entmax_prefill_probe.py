"""Tile configurations of the entmax prefill kernels (forward, dq, dk/dv) on one selection.

    python bench/entmax_prefill_probe.py         # 32K tokens, 75 % skipped, Hq 32 / Hkv 8 / D 128

The selection is computed once (bench/methods_entmax_milestone.py's scale for 75 %); each
config's forward and backward run on it directly (no selection, no autograd), checked
against the default config's outputs first, then timed (medians of plain calls).
Writes bench/results/<GPU>-entmax-prefill-probe.{md,json}.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import methods_entmax_milestone as em  # noqa: E402
from bench.timing import gpu_facts, save_results, time_plain  # noqa: E402
from sparsegen.codegen.entmax_kernels import EntmaxPrefillTriton, EntmaxStatic  # noqa: E402
from sparsegen.methods.entmax import EntmaxRule, prefill_selection  # noqa: E402

T = 32768
SCALE = 52.0   # ~75 % of the causal blocks skipped at 32K (the bench's bisection: 51.9)
BWD = [  # (dq_m, dq_n, kv_m, kv_n, bwd_warps, bwd_stages)
    (32, 32, 32, 32, 8, 2), (32, 32, 32, 32, 4, 2), (64, 32, 32, 64, 8, 2),
    (64, 64, 64, 64, 8, 2), (64, 32, 32, 64, 4, 3), (64, 64, 64, 64, 8, 1),
    (64, 64, 64, 64, 4, 2)]
FWD = [(64, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 8, 3)]  # block_m, block_n, w, s


def main():
    facts = gpu_facts()
    facts["command"] = "python " + " ".join(sys.argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    st = EntmaxStatic(em.BLOCK, em.D, em.G, "bf16")
    q, k, v, w = (t.detach() for t in em.prefill_inputs(T, gen))
    with torch.no_grad():
        sel = prefill_selection(q.float(), k.float(), w, EntmaxRule(block_size=em.BLOCK,
                                                                     scale=SCALE))
    idx, cnt, ridx, rcnt = sel.lists()
    bias = sel.bias.float().contiguous()
    do = torch.randn(q.shape, device="cuda", dtype=em.DT, generator=gen)
    scale = em.D ** -0.5
    base_cfg = EntmaxPrefillTriton.default_config(st)
    base = EntmaxPrefillTriton(st)
    o_ref, lse_ref = base.forward(q, k, v, bias, idx, cnt, scale)
    g_ref = base.backward(q, k, v, bias, idx, cnt, ridx, rcnt, o_ref, lse_ref, do, scale)
    rows = [{"part": "selection", "sparsity": em.prefill_sparsity(sel), "scale": SCALE}]
    configs = [("bwd", {**base_cfg, "dq_m": a, "dq_n": b, "kv_m": c, "kv_n": d,
                        "bwd_warps": wp, "bwd_stages": sg}) for a, b, c, d, wp, sg in BWD]
    configs += [("fwd", {**base_cfg, "block_m": a, "block_n": b, "num_warps": wp,
                         "num_stages": sg}) for a, b, wp, sg in FWD]
    for part, cfg in configs:
        row = {"part": part, "config": cfg}
        try:
            bad = EntmaxPrefillTriton.check_config(st, cfg)
            if bad:
                raise ValueError(bad)
            kern = EntmaxPrefillTriton(st, cfg)
            if part == "fwd":
                o, _ = kern.forward(q, k, v, bias, idx, cnt, scale)
                row["err"] = em.rel_err(o, o_ref)
                fn = lambda: kern.forward(q, k, v, bias, idx, cnt, scale)  # noqa: E731
            else:
                got = kern.backward(q, k, v, bias, idx, cnt, ridx, rcnt, o_ref, lse_ref, do,
                                    scale)
                row["err"] = max(em.rel_err(a, b) for a, b in zip(got, g_ref))
                fn = lambda: kern.backward(q, k, v, bias, idx, cnt, ridx, rcnt,  # noqa: E731
                                           o_ref, lse_ref, do, scale)
            if row["err"] < 2e-2:
                row["ms"] = time_plain([fn], warmup_ms=100, rep_ms=600)
        except Exception as e:  # a config that fails to compile or run is a result
            row["note"] = f"{type(e).__name__}: {str(e)[:160]}"
        print(row, flush=True)
        rows.append(row)

    def write_md(path):
        L = [f"# entmax prefill tile configurations on {facts['gpu']}", "",
             f"- date: {facts['date']}", f"- versions: {facts['versions']}",
             f"- command: `{facts['command']}`",
             f"- T {T}, B 1, Hq {em.HQ}, Hkv {em.HKV}, D {em.D}, block {em.BLOCK}, scale "
             f"{SCALE}: sparsity {rows[0]['sparsity']:.3f} of the causal blocks; default "
             f"config {base_cfg}", "",
             "| part | tiles | warps / stages | ms | rel err vs default | note |",
             "|---|---|---|---|---|---|"]
        for r in rows[1:]:
            c = r["config"]
            if r["part"] == "fwd":
                tiles, ws = f"m {c['block_m']} n {c['block_n']}", f"{c['num_warps']} / {c['num_stages']}"
            else:
                tiles = f"dq {c['dq_m']}x{c['dq_n']}, kv {c['kv_m']}x{c['kv_n']}"
                ws = f"{c['bwd_warps']} / {c['bwd_stages']}"
            L.append(f"| {r['part']} | {tiles} | {ws} | {r.get('ms', float('nan')):.2f} | "
                     f"{r.get('err', float('nan')):.1e} | {r.get('note', '')} |")
        Path(path).write_text("\n".join(L) + "\n")
    stem = ROOT / "bench" / "results" / f"{facts['gpu_slug']}-entmax-prefill-probe"
    save_results(stem, facts, rows, write_md)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench/entmax_prefill_probe.py needs a CUDA GPU")
    main()
