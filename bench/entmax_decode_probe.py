"""Why the entmax decode attention is slower than the plain sparse decode on the same blocks.

    python bench/entmax_decode_probe.py            # B 8, 128K, 90 % skipped, Hq 32 / Hkv 8 / D 128

One entmax selection (the Triton tau kernels at the scale that skips 90 % of the blocks),
then CUDA-graph medians of: the tau solve; the decode with the prior (EntmaxDecodeTriton) at
its default config and a few others; the plain sparse decode (no prior) on the same blocks,
with the index rows at the selection's width and trimmed to the widest count. Outputs are
checked against the reference first. Writes bench/results/<GPU>-entmax-decode-probe.{md,json}.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import methods_entmax_milestone as em  # noqa: E402
from bench.timing import (gpu_facts, rel_err, require_cuda, results_header,  # noqa: E402
                          save_results, time_graph)
from sparsegen.codegen.entmax_kernels import (EntmaxDecodeTriton, EntmaxStatic,  # noqa: E402
                                              EntmaxTauTriton)
from sparsegen.codegen.triton_decode import TritonSparseDecode  # noqa: E402
from sparsegen.methods.sparse_decode_ref import sparse_decode_reference  # noqa: E402


def main():
    facts = gpu_facts()
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, n = 8, 131072
    k, v, seq, summ, qs, c = em.entmax_decode_state(B, n, 0.9, gen)
    st = EntmaxStatic(em.BLOCK, em.D, em.G, "bf16")
    tau = EntmaxTauTriton(st, scale=c)
    sels = [tau(q, summ, seq, [n] * B) for q in qs]
    sels = [type(s)(s.indices.clone(), s.counts.clone(), s.bias.clone()) for s in sels]
    widest = int(max(int(s.counts.max()) for s in sels))
    rows = [{"part": "tau", "config": tau.config, "widest": widest,
             "mean_selected": float(sels[0].counts.float().mean()),
             "graph_ms": time_graph([lambda q=q: tau(q, summ, seq, [n] * B) for q in qs])}]
    ref = sparse_decode_reference(qs[0], k, v, sels[0].indices, sels[0].counts, seq, em.BLOCK,
                                  block_bias=sels[0].bias, validate=False)
    ref_plain = sparse_decode_reference(qs[0], k, v, sels[0].indices, sels[0].counts, seq,
                                        em.BLOCK, validate=False)
    base = EntmaxDecodeTriton.default_config(st)
    variants = [("prior", base), ("prior", {**base, "waves": 2}), ("prior", {**base, "waves": 4}),
                ("prior", {**base, "num_stages": 2}), ("prior", {**base, "block_n": 32,
                                                                 "num_stages": 4}),
                ("plain", base)]
    for kind, cfg in variants:
        for trim in (False, True):
            row = {"part": "attend", "kind": kind, "config": cfg, "trimmed": trim}
            try:
                if kind == "prior":
                    kern = EntmaxDecodeTriton(st, cfg)
                else:
                    kern = TritonSparseDecode(st.decode_static(), cfg)
                w = widest if trim else sels[0].indices.shape[-1]
                args = [(q, s.indices[..., :w].contiguous(), s.counts, s.bias[..., :w].contiguous())
                        for q, s in zip(qs, sels)]

                def call(a, kern=kern, kind=kind):
                    q, i, cnt, bias = a
                    if kind == "prior":
                        return kern(q, k, v, i, cnt, seq, block_bias=bias)
                    return kern(q, k, v, i, cnt, seq)
                out = call(args[0])
                want = ref if kind == "prior" else ref_plain
                row["rel_err"] = rel_err(out, want)
                if row["rel_err"] < 1e-2:
                    row["graph_ms"] = time_graph([lambda a=a: call(a) for a in args])
                    kv_bytes = float(sels[0].counts.sum()) * em.BLOCK * em.D * 2 * 2
                    row["TBps"] = kv_bytes / row["graph_ms"] / 1e9
            except Exception as e:  # a failing variant is a result
                row["note"] = f"{type(e).__name__}: {str(e)[:160]}"
            print(row, flush=True)
            rows.append(row)

    def write_md(path):
        L = [*results_header("entmax decode probe", facts),
             f"- B {B}, {n} tokens, Hq {em.HQ}, Hkv {em.HKV}, D {em.D}, block {em.BLOCK}, "
             f"scale {c:.3f}; tau {rows[0]['graph_ms']:.4f} ms (graph), config "
             f"{rows[0]['config']}; selected {rows[0]['mean_selected']:.0f} blocks on average, "
             f"widest row {widest}", "",
             "| kernel | config | index width | graph ms | TB/s of selected KV | rel err | note |",
             "|---|---|---|---|---|---|---|"]
        for r in rows[1:]:
            L.append(f"| {r['kind']} | {r['config']} | {'widest' if r['trimmed'] else 'capacity'}"
                     f" | {r.get('graph_ms', float('nan')):.4f} | {r.get('TBps', float('nan')):.2f}"
                     f" | {r.get('rel_err', float('nan')):.1e} | {r.get('note', '')} |")
        Path(path).write_text("\n".join(L) + "\n")
    stem = ROOT / "bench" / "results" / f"{facts['gpu_slug']}-entmax-decode-probe"
    save_results(stem, facts, rows, write_md)


if __name__ == "__main__":
    require_cuda()
    main()
