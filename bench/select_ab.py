"""A selection kernel's template against the same template at an earlier git revision.

    python bench/select_ab.py --rev 89115f1     # entmax tau solve, gate / NSA block_select
    python bench/select_ab.py --rev 89115f1 --old-templates DIR   # no git here: DIR holds
                                                # the templates/ tree as it was at --rev

Each kernel runs at its default config with the template of this checkout ("new") and the
template as it was at --rev ("old", rendered with the same parameters), on the same inputs:
the entmax tau solve (scores + select) at the scale that skips 90 % of the blocks of a random
cache, block_select on random scores keeping 10 % of the blocks (block 64, one score row a
KV head, as the gate and NSA select). Both are checked to select exactly the same blocks
first (block_select bit for bit; the entmax solve against torch's selection, >= 99 % of rows
identical for both); times are ms per call of CUDA graphs of 8 calls (medians), the two
variants alternating in one loop, each call on one of 4 input copies in turn so the summaries
/ scores come from memory as in a decode step.
block_select_quest_b16: Quest per head at block 16 (a radix select per query head's row,
then the union of the group's rows), a tenth of the blocks of each row.
Writes bench/results/<GPU>-select-ab.{md,json}.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import methods_entmax_milestone as em  # noqa: E402
from bench.block_select_probe import triton_only  # noqa: E402
from bench.timing import (fmt, gpu_facts, note, require_cuda, results_header,  # noqa: E402
                          save_results, time_graph_per_call)
from sparsegen.codegen.entmax_kernels import EntmaxTauTriton  # noqa: E402
from sparsegen.codegen.render import render_to_file  # noqa: E402
from sparsegen.codegen.select_kernels import SelectStatic, TritonBlockSelect  # noqa: E402
from sparsegen.methods.entmax import EntmaxRule, select_blocks  # noqa: E402

COPIES = 4
SHAPES = [(8, 32768), (8, 131072), (16, 32768), (16, 131072)]


OLD_TEMPLATES = None  # --old-templates: where the old templates are when git is not


def old_source(rev: str, template: str) -> str:
    if OLD_TEMPLATES is not None:
        return (Path(OLD_TEMPLATES) / template).read_text()
    return subprocess.run(["git", "show", f"{rev}:templates/{template}"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout


def at_revision(cls, rev: str, *args, **kwargs):
    """cls(*args, **kwargs), made to run its template as it was at git revision rev."""
    src = old_source(rev, cls.template)

    class AtRevision(cls):
        def render(self):
            return render_to_file(self.template, self.template_params(), self.build_dir, src)

    return AtRevision(*args, **kwargs)


def entmax_rows(batch, seq_len, rev, gen):
    """Selections are checked against torch's (select_blocks), not bit for bit against each
    other: a template that sums in another order moves tau in its last bits, which flips a
    block whose probability is within rounding of 0 (the tuner's exact inputs avoid that)."""
    k, v, seq, summ, qs, c = em.entmax_decode_state(batch, seq_len, 0.9, gen)
    del k, v
    summs = [summ] + [summ.clone() for _ in range(COPIES - 1)]
    lengths = [seq_len] * batch
    nb = -(-seq_len // em.BLOCK)
    new = EntmaxTauTriton(em.ENTMAX_STATIC, scale=c)
    old = at_revision(EntmaxTauTriton, rev, em.ENTMAX_STATIC, scale=c)
    want = select_blocks(qs[0], summ, seq, EntmaxRule(block_size=em.BLOCK, scale=c), width=nb)
    agree = []
    for kern in (new, old):
        got = kern(qs[0], summ, seq, lengths)
        agree.append(sum(got.blocks(b, h) == want.blocks(b, h) for b in range(batch)
                         for h in range(em.HKV)) / (batch * em.HKV))
    kept = float(want.counts.float().mean()) / nb

    def calls(kern):
        return [lambda s=s: kern(qs[0], s, seq, lengths) for s in summs]
    return min(agree) >= 0.99, kept, calls(new), calls(old), agree


def select_rows(batch, seq_len, rev, gen, st=SelectStatic(64)):
    nb = seq_len // st.block_size
    # 10 % of the blocks a KV head; with several rows (Quest per head) a tenth of that per
    # row, as the decode step asks, so that the union stays within the budget
    inputs = TritonBlockSelect.bench_inputs(st, batch, seq_len,
                                            budget_blocks=nb // 10 // st.rows)
    scores = [inputs["scores"]] + [torch.randn(inputs["scores"].shape, device="cuda",
                                               generator=gen) for _ in range(COPIES - 1)]
    kw = {k: v for k, v in inputs.items() if k != "scores"}
    cfg = triton_only(TritonBlockSelect.default_config(st))   # the Triton template, both sides
    new = TritonBlockSelect(st, cfg)
    old = at_revision(TritonBlockSelect, rev, st, cfg)
    same = all(torch.equal(x, y) for s in scores
               for x, y in zip(new(s, **kw), old(s, **kw)))
    kept = kw["k"] / nb

    def calls(kern):
        return [lambda s=s: kern(s, **kw) for s in scores]
    return same, kept, calls(new), calls(old), [float(same)] * 2


def quest_select_rows(batch, seq_len, rev, gen):
    """Quest per head at block 16: a radix select per query head's row (block_threshold),
    then the union of the group's 4 rows (block_select)."""
    return select_rows(batch, seq_len, rev, gen, SelectStatic(16, "topk", 4))


KERNELS = {"entmax_tau": entmax_rows, "block_select": select_rows,
           "block_select_quest_b16": quest_select_rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="git revision of the old templates")
    ap.add_argument("--out", default=None, help="results stem (default bench/results/<GPU>-select-ab)")
    ap.add_argument("--kernels", nargs="*", choices=list(KERNELS), help="default: all")
    ap.add_argument("--old-templates", default=None,
                    help="folder holding templates/ as it was at --rev (where git is not)")
    args = ap.parse_args()
    require_cuda()
    global OLD_TEMPLATES
    OLD_TEMPLATES = args.old_templates
    facts = gpu_facts()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for kernel, fn in KERNELS.items():
        if args.kernels and kernel not in args.kernels:
            continue
        for batch, seq_len in SHAPES:
            row = {"kernel": kernel, "batch": batch, "seq_len": seq_len}
            try:
                same, kept, new, old, agree = fn(batch, seq_len, args.rev, gen)
                row.update(same_selection=same, kept=round(kept, 4),
                           agree_new=round(agree[0], 4), agree_old=round(agree[1], 4))
                if same:
                    # alternate the variants so drift hits both alike
                    t_new, t_old = [], []
                    for _ in range(3):
                        t_new.append(time_graph_per_call(new))
                        t_old.append(time_graph_per_call(old))
                    row["new_ms"], row["old_ms"] = sorted(t_new)[1], sorted(t_old)[1]
                    row["speedup"] = round(row["old_ms"] / row["new_ms"], 3)
            except Exception as e:  # a failure is a result
                note(row, "error", e)
            rows.append(row)
            print(row, flush=True)
    stem = args.out or str(ROOT / "bench" / "results" / f"{facts['gpu_slug']}-select-ab")

    def write_markdown(path):
        lines = results_header(f"selection kernels: this checkout's templates vs {args.rev}",
                               facts)
        lines += ["- default configs; same inputs; ms per call of CUDA graphs of 8 calls "
                  "(median of 3 alternating runs each) over 4 input copies in turn", "",
                  "| kernel | B | len | kept | rows = reference (new / old) | old ms | new ms "
                  "| speedup |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['kernel']} | {r['batch']} | {r['seq_len']} | {r.get('kept', '-')} "
                         f"| {r.get('agree_new', '-')} / {r.get('agree_old', '-')} | {fmt(r.get('old_ms'), '.4f')} | "
                         f"{fmt(r.get('new_ms'), '.4f')} | {r.get('speedup', r.get('error', '-'))} |")
        Path(path).write_text("\n".join(lines) + "\n")
    save_results(stem, {**facts, "rev": args.rev}, rows, write_markdown)


if __name__ == "__main__":
    main()
