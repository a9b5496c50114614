"""`sparsegen` command line: check, compile, tune, build, db, distill.

Every user error (SparsegenError) is printed as one line on stderr with exit code 2; a
traceback only ever appears for a bug in sparsegen itself, and then with a request to
report it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .codegen.backend import decode_backend
from .errors import SparsegenError


def _load(path: str):
    from .plan import make_plan
    from .spec import load_spec

    spec = load_spec(path)
    return spec, make_plan(spec)


def cmd_check(args) -> int:
    import yaml

    spec, plan = _load(args.spec)
    print(f"# {args.spec}: valid")
    print(yaml.safe_dump({"spec": spec.to_dict(), "plan": plan.describe()}, sort_keys=False,
                         default_flow_style=None, width=100), end="")
    return 0


def _configs_to_compile(kernel, defaults: list[tuple[str, dict]],
                        db) -> list[tuple[str, dict]]:
    """The (backend, config) defaults given, then every distinct config the database holds for
    this kernel (attention or rule kernel plan; on any GPU, with today's templates) on one of
    their backends: what an emitted package may load or its decoder render."""
    from .emit import _best_entries
    from .tune.db import kernel_identity

    out = list(defaults)
    backends = {b for b, _ in defaults}
    for _gpu, entries in _best_entries(db, kernel_identity(kernel)):
        for e in entries:
            cand = (e["best"]["backend"], e["best"]["config"])
            if cand[0] in backends and cand not in out:
                out.append(cand)
    return out


def cmd_compile(args) -> int:
    """Render every kernel of the plan (attention and rule kernels) with its default configs
    and the tuned configs in the database, and compile each for Hopper; needs no GPU."""
    from .plan import rule_kernel_plans
    from .tune.db import TuningDB, backend_label

    spec, plan = _load(args.spec)
    build_dir = Path(args.build_dir) if args.build_dir else None
    db = TuningDB(args.db)
    failures = 0
    for kernel in plan.kernels:
        defaults = [(b, decode_backend(b).default_config(kernel.static)) for b in kernel.backends]
        for backend, config in _configs_to_compile(kernel, defaults, db):
            try:
                adapter = decode_backend(backend)(kernel.static, config, build_dir)
            except ValueError as e:  # a stored config today's adapter rejects
                failures += 1
                print(f"FAIL {kernel.name} [{backend}] {config}: {e}")
                continue
            path = adapter.render()
            try:
                facts = adapter.compile_sm90()
            except Exception as e:  # a compiler failure is reported, not raised
                failures += 1
                print(f"FAIL {kernel.name} [{backend}] {path}: {str(e).splitlines()[0][:300]}")
                continue
            print(f"ok   {kernel.name} [{backend}] {adapter.config} -> {path.name} "
                  f"{json.dumps(facts, default=str)}")
    tuned_rules = {k.name: k for k in rule_kernel_plans(plan)}
    for name, adapter_cls, static in plan.rule_kernels:
        # rule kernels have one backend: Triton adapters (TileLang forms are their `algo`)
        configs = ([c for _, c in _configs_to_compile(
            tuned_rules[name], [("triton", adapter_cls.default_config(static))], db)]
            if name in tuned_rules else [None])
        for config in configs:
            try:
                adapter = adapter_cls(static, config, build_dir)
                facts = adapter.compile_sm90()
            except Exception as e:  # a stored config today's adapter rejects, or a compiler failure
                failures += 1
                print(f"FAIL {name} [triton] {config}: {str(e).splitlines()[0][:300]}")
                continue
            print(f"ok   {name} [{backend_label('triton', adapter.config)}] {adapter.config} "
                  f"{json.dumps(facts, default=str)[:300]}")
    if failures:
        raise SparsegenError(f"{failures} kernel(s) failed to compile for sm_90a")
    return 0


def _add_tuning_commands(sub) -> None:
    """tune / build / db live in sparsegen.tune and sparsegen.emit; distill in distill_cli."""
    from .distill_cli import register as register_distill
    from .tune.commands import register

    register(sub)
    register_distill(sub)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparsegen", description="Compile sparse-attention specs into tuned GPU kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate a spec; print it normalized with its kernel plan")
    p.add_argument("spec")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("compile", help="render and compile the plan's kernels for sm_90a (no GPU)")
    p.add_argument("spec")
    p.add_argument("--build-dir", default=None, help="where rendered kernels go")
    p.add_argument("--db", default=None, help="tuning database (default: $SPARSEGEN_TUNING_DB "
                   "or ./tuning_db)")
    p.set_defaults(func=cmd_compile)
    _add_tuning_commands(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SparsegenError as e:
        print(f"sparsegen: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable output dir, a full disk: the path and the reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"sparsegen: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsegen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
