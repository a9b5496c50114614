"""CLI commands `tune`, `build` and `db` (registered into sparsegen.cli's subparsers)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import SparsegenError


def register(sub) -> None:
    p = sub.add_parser("tune", help="autotune the plan's kernels on this GPU; record winners "
                       "in tuning_db/")
    p.add_argument("spec")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="shared Optuna storage (postgresql://USER:PASS@HOST/DB) so several "
                   "workers (one per GPU, any host) tune one study; default: a local journal "
                   "file under $SPARSEGEN_CACHE_DIR (~/.cache/sparsegen), resumable")
    p.add_argument("--trials", type=_positive, default=None,
                   help="evaluated candidates per kernel and shape (default: spec tuning.trials)")
    p.add_argument("--workers", type=_positive, default=min(4, os.cpu_count() or 1),
                   help="CPU compile workers (trials in flight at once; default %(default)s)")
    p.add_argument("--timeout", type=_positive_float, default=None, metavar="S",
                   help="per-candidate GPU time limit (default: spec tuning.timeout_s)")
    p.add_argument("--gpu-name", default=None, metavar="NAME@CC",
                   help="key results by this GPU, e.g. 'NVIDIA H100 80GB HBM3@9.0' (default: "
                   "$SPARSEGEN_GPU, else GPU 0)")
    p.add_argument("--db", default=None, metavar="DIR",
                   help="tuning database (default: $SPARSEGEN_TUNING_DB or ./tuning_db)")
    p.add_argument("--build-dir", default=None, help="where rendered kernels go")
    p.add_argument("--kernels", nargs="+", default=(), metavar="NAME",
                   help="tune only these kernels of the plan (e.g. block_select; "
                   "`sparsegen check` lists them); default: all")
    p.add_argument("--shapes", nargs="+", default=(), metavar="bB_sS",
                   help="tune only these shape buckets (e.g. b16_s32768); default: all")
    p.add_argument("--time-limit", type=_positive_float, default=None, metavar="S",
                   help="stop the run after S seconds: a study under way records its best so "
                   "far, studies not started are left for the next run")
    p.add_argument("--retune", action="store_true",
                   help="search again where the database already has a winner (it is measured "
                   "again beside the new candidates, so the result is never worse); with "
                   "--trials above the first run's to search further")
    p.add_argument("-o", "--out", default=None, metavar="DIR",
                   help="then build the Python package into DIR (as `sparsegen build`)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("build", help="write the importable Python package (nn.Module + tuned "
                       "configs + rendered kernels); needs no GPU")
    p.add_argument("spec")
    p.add_argument("-o", "--out", required=True, metavar="DIR")
    p.add_argument("--db", default=None, metavar="DIR", help="tuning database (./tuning_db)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("db", help="list, show or prune tuning-database entries")
    dbsub = p.add_subparsers(dest="db_command", required=True)
    q = dbsub.add_parser("list", help="one line per entry")
    _db_filters(q)
    q.set_defaults(func=cmd_db_list)
    q = dbsub.add_parser("show", help="print matching entries in full (JSON)")
    _db_filters(q)
    q.set_defaults(func=cmd_db_show)
    q = dbsub.add_parser("prune", help="remove matching entries")
    _db_filters(q)
    q.add_argument("--stale", action="store_true",
                   help="only entries whose kernel templates or backend adapters changed "
                   "since they were tuned")
    q.add_argument("--other-versions", action="store_true",
                   help="only entries tuned with other tilelang/triton/torch versions than "
                   "the installed ones")
    q.add_argument("--all", action="store_true", help="allow pruning with no filter at all")
    q.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    q.set_defaults(func=cmd_db_prune)
    q = dbsub.add_parser("merge", help="bring the entries of another tuning database (e.g. "
                         "one tuned on another machine) into this one")
    q.add_argument("source", metavar="SRC", help="the database directory to merge from")
    q.add_argument("--db", default=None, metavar="DIR", help="tuning database (./tuning_db)")
    q.add_argument("--prefer", choices=("faster", "newer", "source", "db"), default="faster",
                   help="where both have an entry for the same GPU, kernel, shape and versions: "
                   "keep the faster winner (default), the later tuned (to bring back a "
                   "re-tune: timings of two runs differ by a few %%), the source's, or the "
                   "database's")
    q.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")
    q.set_defaults(func=cmd_db_merge)


def _positive(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def _positive_float(text: str) -> float:
    import argparse
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return v


def _db_filters(p) -> None:
    p.add_argument("--db", default=None, metavar="DIR", help="tuning database (./tuning_db)")
    p.add_argument("--gpu", default=None, help="GPU slug (directory name), e.g. "
                   "nvidia-h100-80gb-hbm3-sm90")
    p.add_argument("--kernel", default=None, help="kernel name or key (prefix), e.g. "
                   "sparse_decode or 3f2a")
    p.add_argument("--shape", default=None, help="shape bucket, e.g. b8_s32768")


def _load(path: str):
    from ..plan import make_plan
    from ..spec import load_spec

    spec = load_spec(path)
    return spec, make_plan(spec)


def _db(args):
    from .db import TuningDB

    return TuningDB(args.db)


# ---------------------------------------------------------------------------------------
def cmd_tune(args) -> int:
    from .db import detect_gpu
    from .tuner import TuneOptions, print_summary, tune_plan

    spec, plan = _load(args.spec)
    opts = TuneOptions(
        gpu=detect_gpu(args.gpu_name), db=_db(args),
        trials=args.trials or spec.tuning.trials,
        timeout_s=args.timeout or spec.tuning.timeout_s, workers=args.workers,
        storage=args.storage, build_dir=Path(args.build_dir) if args.build_dir else None,
        seed=spec.tuning.seed, kernels=tuple(args.kernels), shapes=tuple(args.shapes),
        retune=args.retune, time_limit_s=args.time_limit)
    results = tune_plan(plan, opts)
    print_summary(results)
    failed = [r for r in results if r.status == "failed"]
    deferred = [r for r in results if r.status == "deferred"]
    if deferred:
        print(f"sparsegen: the time limit left {len(deferred)} of {len(results)} shape(s) "
              "untuned; run `tune` again to do them", file=sys.stderr)
    if args.out:
        cmd_build(args, plan)
    if failed:
        print(f"sparsegen: {len(failed)} of {len(results)} shape(s) found no working "
              "candidate (see above); the module uses the default config there",
              file=sys.stderr)
        return 1
    return 0


def cmd_build(args, plan=None) -> int:
    from ..emit import build_package

    if plan is None:
        _, plan = _load(args.spec)
    db = _db(args)
    path = build_package(plan, args.out, db)
    configs = json.loads((path / "tuned_configs.json").read_text())
    tuned = {gpu: len(v["buckets"]) for k in configs["kernels"].values()
             for gpu, v in k["tuned"].items()}
    what = ", ".join(f"{n} tuned bucket(s) for {g}" for g, n in tuned.items()) or \
        "no tuned configs (default config everywhere)"
    if not db.root.is_dir():  # a mistyped --db / $SPARSEGEN_TUNING_DB: say so, not just "untuned"
        what += (f"; there is no tuning database at {db.root}: give --db (or "
                 "$SPARSEGEN_TUNING_DB) the directory `sparsegen tune` wrote")
    print(f"built {path} ({what}); import it with `sys.path.insert(0, {str(path.parent)!r})`"
          f" then `from {path.name} import SparseDecodeAttention`")
    return 0


# ---------------------------------------------------------------------------------------
def _matches(args, data: dict, entry: dict) -> bool:
    from .db import GpuId, shape_key

    slug = GpuId(data["gpu"]["name"], data["gpu"]["capability"]).slug
    k = data["kernel"]
    if args.gpu and args.gpu != slug:
        return False
    if args.kernel and args.kernel != k["name"] and not k["key"].startswith(args.kernel):
        return False
    return not args.shape or args.shape == shape_key(entry["shape"])


def _selected(args):
    for path, data in _db(args).load_all():
        for entry in data["entries"]:
            if _matches(args, data, entry):
                yield path, data, entry


def cmd_db_list(args) -> int:
    from .db import backend_label, shape_key

    rows = []
    for path, data, e in _selected(args):
        b, d = e["best"], e["default"]
        gain = f"{d['median_ms'] / b['median_ms']:.2f}x" if d["median_ms"] else "-"
        bw = f"{b['bandwidth_gbs']:.0f}" if b.get("bandwidth_gbs") else "-"
        vers = " ".join(f"{k}={v}" for k, v in sorted(e["versions"].items()))
        rows.append((path.parent.name, f"{data['kernel']['name']}-{data['kernel']['key'][:8]}",
                     shape_key(e["shape"]), backend_label(b["backend"], b["config"]),
                     f"{b['median_ms']:.4f}", bw, gain,
                     vers))
    if not rows:
        print(f"no entries in {_db(args).root}" + (" matching the filters" if
                                                   (args.gpu or args.kernel or args.shape) else ""))
        return 0
    head = ("gpu", "kernel", "shape", "backend", "ms", "GB/s", "vs default", "versions")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_db_show(args) -> int:
    out = []
    for path, data, e in _selected(args):
        out.append({"file": str(path), "gpu": data["gpu"], "kernel": data["kernel"], **e})
    if not out:
        raise SparsegenError(f"no entries in {_db(args).root} match the filters")
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def cmd_db_prune(args) -> int:
    from .db import library_versions, shape_key, templates_current

    if not (args.gpu or args.kernel or args.shape or args.stale or args.other_versions
            or args.all):
        raise SparsegenError("db prune needs a filter (--gpu, --kernel, --shape, --stale, "
                             "--other-versions) or --all to remove every entry")
    current = library_versions()

    def doomed(data, entry) -> bool:
        return (_matches(args, data, entry)
                and (not args.stale or not templates_current(data["kernel"]["templates"]))
                and (not args.other_versions or entry["versions"] != current))

    db = _db(args)
    if args.dry_run:
        gone = [(p, e) for p, d, e in ((p, d, e) for p, d in db.load_all()
                                       for e in d["entries"]) if doomed(d, e)]
    else:
        gone = db.prune(lambda data, entry: not doomed(data, entry))
    verb = "would remove" if args.dry_run else "removed"
    for path, e in gone:
        print(f"{verb} {path} {shape_key(e['shape'])}")
    print(f"{verb} {len(gone)} entr{'y' if len(gone) == 1 else 'ies'}")
    return 0


def cmd_db_merge(args) -> int:
    from .db import TuningDB, shape_key

    src = Path(args.source)
    if not src.is_dir():
        raise SparsegenError(f"{src}: no such database directory (the SRC of db merge is a "
                             "tuning_db folder, e.g. one copied back from a GPU machine)")
    prefer = {"faster": "faster", "newer": "newer", "source": "other", "db": "this"}[args.prefer]
    done = _db(args).merge(TuningDB(src), prefer, dry_run=args.dry_run)
    if not done:
        print(f"no entries in {src}")
        return 0
    would = "would be " if args.dry_run else ""
    for action, path, e in done:
        if action != "kept":
            print(f"{would}{action} {path} {shape_key(e['shape'])}")
    counts = {a: sum(1 for x, _, _ in done if x == a) for a in ("added", "replaced", "kept")}
    print(f"{would}added {counts['added']}, {would}replaced {counts['replaced']}, "
          f"kept {counts['kept']} (--prefer {args.prefer})")
    return 0
