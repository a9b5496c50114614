"""Tuned-over-default table from the tuning database (no GPU): for every entry, the winner's
time against the heuristic default of the spec's first backend, as `tune` measured both.

    python bench/tuned_vs_default.py [--db tuning_db] [--out bench/results/H100-tune-examples.md]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsegen.tune.db import TuningDB, backend_label  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default=str(ROOT / "tuning_db"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", action="append", default=[], help="extra lines for the header")
    args = ap.parse_args()
    lines = ["# Tuned vs heuristic default (from tuning_db/)", "",
             *[f"- {n}" for n in args.note], "",
             "| GPU | kernel file | shape | selected blocks | default (backend) ms | "
             "tuned (backend) ms | speedup | trials measured/failed/infeasible |",
             "|---|---|---|---|---|---|---|---|"]
    for path, data in TuningDB(args.db).load_all():  # validated: checksums, schema
        for e in sorted(data["entries"], key=lambda e: (e["shape"]["batch"], e["shape"]["seq_len"])):
            best, default, tr = e["best"], e["default"], e["trials"]
            lines.append(
                f"| {path.parent.name} | {path.stem} | b{e['shape']['batch']} "
                f"s{e['shape']['seq_len']} | {e['selected_blocks']} | {default['median_ms']:.4f} "
                f"({backend_label(default['backend'], default['config'])}) | "
                f"{best['median_ms']:.4f} ({backend_label(best['backend'], best['config'])}) | "
                f"{default['median_ms'] / best['median_ms']:.2f}x | "
                f"{tr['measured']}/{tr['failed']}/{tr['infeasible']} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
