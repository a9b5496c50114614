"""Where the TileLang tau kernel's time goes, beside the Triton solve (EntmaxTau algo=tilelang).

    python bench/entmax_tau_tilelang_probe.py      # B 8 / 16 x 32K / 128K, 90 % skipped
    python bench/entmax_tau_tilelang_probe.py --batch 8 --seq-len 131072 --forms cut "s3 w8"
    python bench/entmax_tau_tilelang_probe.py --forms "bj64 s3 w8" cut '!cluster'

The decode selection of the entmax rule at the scale that skips 90 % of the blocks: the
Triton pair (entmax_scores + entmax_select) at its default config, and the one-kernel
TileLang form at several (block_j, stages, warps, cluster), each first checked to select
exactly what the Triton pair selects; then two cuts of the first TileLang config that tell
its parts apart (not checked, they select differently by design): no Halley steps (what the four
solve passes cost) and sequences of two blocks over the same capacity (no scoring: the
launch, the register run and the passes over an empty row), the latter also for a cluster
of 2 (what the cluster's launch, push and barrier add). Times are CUDA-graph medians per
call of one graph that solves over 4 copies of the summaries in turn, so every call reads
its summaries from memory, as a decode layer does.
Writes bench/results/<GPU>-entmax-tau-tilelang-probe.{md,json}.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import methods_entmax_milestone as em  # noqa: E402
from bench.entmax_tau_probe import COPIES, probe_main, recorded, solve_us  # noqa: E402
from bench.timing import results_header  # noqa: E402
from sparsegen.codegen.entmax_tau import EntmaxTau  # noqa: E402

TILELANG = [  # (block_j, stages, warps, cluster, head_split): one CTA a row and one warp a
    # head, then the heads split over the warps, then a cluster of 2 / 4
    (64, 3, 8, 1, 0), (64, 2, 8, 1, 0), (128, 3, 8, 1, 0), (256, 2, 8, 1, 0), (128, 2, 16, 1, 0),
    (256, 2, 16, 1, 0), (64, 3, 8, 1, 1), (128, 2, 16, 1, 1), (64, 3, 8, 2, 0),
    (64, 3, 8, 2, 1), (128, 2, 8, 2, 0), (64, 2, 8, 4, 0), (64, 1, 8, 4, 0), (128, 2, 8, 4, 0),
    (128, 2, 16, 4, 0)]


def _tl_config(block_j, stages, warps, cluster, head_split=0):
    return dict(EntmaxTau.default_config(em.ENTMAX_STATIC), algo="tilelang",
                block_j=block_j, stages=stages, num_warps=warps, cluster=cluster,
                head_split=head_split)


def _tl_name(block_j, stages, warps, cluster, head_split):
    return (f"tilelang bj{block_j} s{stages} w{warps}" + (f" cluster {cluster}" if cluster > 1
                                                          else "")
            + (" split" if head_split else ""))


def variants(forms=None):
    """(name, statics, config, sequence blocks or None, checked); with `forms`, only those
    whose names hold one of them and none given as "!SUBSTR" (and the Triton reference)."""
    st = em.ENTMAX_STATIC
    out = [("triton default", st, None, None, True)]
    out += [(_tl_name(*t), st, _tl_config(*t), None, True) for t in TILELANG]
    first = _tl_config(*TILELANG[0])
    out += [("  cut: no Halley steps", dataclasses.replace(st, halley_iters=0), first, None,
             False),
            ("  cut: 2-block sequences (no scoring)", st, first, 2, False),
            ("  cut: 2-block sequences, cluster 2", st, _tl_config(64, 3, 8, 2), 2, False),
            ("  cut: no Halley steps, cluster 2", dataclasses.replace(st, halley_iters=0),
             _tl_config(64, 3, 8, 2), None, False),
            ("  cut: no Halley steps, split", dataclasses.replace(st, halley_iters=0),
             _tl_config(64, 3, 8, 1, 1), None, False),
            ("  cut: 2-block sequences, split", st, _tl_config(64, 3, 8, 1, 1), 2, False)]
    if forms is None:
        return out
    keep = [f for f in forms if not f.startswith("!")]
    drop = [f[1:] for f in forms if f.startswith("!")]
    return [v for v in out if v[0] == "triton default"
            or (any(f in v[0] for f in keep) and not any(f in v[0] for f in drop))]


def probe(batch, seq_len, gen, rows, args):
    k, v, seq, summ, qs, c = em.entmax_decode_state(batch, seq_len, 0.9, gen)
    del k, v
    summs = [summ] + [summ.clone() for _ in range(COPIES - 1)]
    forms = variants(args.forms)
    em.prewarm_taus([EntmaxTau(st, config) for _, st, config, _, _ in forms if config], summ)
    want = None
    for name, st, config, blocks, checked in forms:
        with recorded(rows, {"batch": batch, "seq_len": seq_len, "form": name,
                             "config": config}) as row:
            tau = EntmaxTau(st, config, scale=c)
            s = seq if blocks is None else torch.full_like(seq, blocks * st.block_size)
            lengths = [int(x) for x in s.tolist()]
            sel = tau(qs[0], summ, s, lengths)
            got = (sel.indices.clone(), sel.counts.clone(), sel.bias.clone())
            if want is None:
                want = got
            if checked:
                c_ = int(got[1].max())
                row["same_selection"] = (torch.equal(got[1], want[1]) and torch.equal(
                    got[0][..., :c_], want[0][..., :c_]))
                if not row["same_selection"]:
                    raise RuntimeError("selects differently from the Triton pair")
            row["tau_us"] = solve_us(tau, qs, summs, s, lengths)
    torch.cuda.empty_cache()


def write_markdown(rows, facts, path):
    lines = [*results_header("entmax tau solve: the TileLang kernel's parts", facts),
             "- Hq 32, Hkv 8, D 128, block 64, bf16, 90 % of blocks skipped; us per solve "
             f"(CUDA graph over {COPIES} copies of the summaries in turn); checked forms select "
             "exactly what the Triton pair does; the cuts are not checked (see the script)", ""]
    for shape in sorted({(r["batch"], r["seq_len"]) for r in rows}):
        rs = [r for r in rows if (r["batch"], r["seq_len"]) == shape]
        base = next((r["tau_us"] for r in rs if r["form"] == "triton default" and "tau_us" in r),
                    None)
        lines += [f"## B {shape[0]}, {shape[1]} tokens", "", "| form | us | vs Triton | note |",
                  "|---|---|---|---|"]
        for r in rs:
            us = r.get("tau_us")
            vs = f"{base / us:.2f}x" if us and base else "-"
            lines.append(f"| {r['form']} | {us:.1f} | {vs} | {r.get('note', '')[:80]} |"
                         if us else f"| {r['form']} | - | - | {r.get('note', '')[:80]} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def _forms_option(ap):
    ap.add_argument("--forms", nargs="+", default=None,
                    help="only the variants whose names hold one of these and none given as "
                         "'!SUBSTR' (and the Triton one)")


def main():
    probe_main(__doc__, probe, write_markdown, "entmax-tau-tilelang-probe", _forms_option)


if __name__ == "__main__":
    main()
