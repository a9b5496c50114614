"""The emitted package of an example spec, as a bench's source of the configs a user gets.

Benches time the method kernels at the configs the emitted module would run on this GPU (its
nearest tuned bucket in tuning_db/), where the bench's kernel statics are the example spec's;
elsewhere they fall back to the kernels' defaults and say so.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PACKAGES: dict = {}


def emitted(spec_stem: str):
    """(spec, package module) of examples/specs/<spec_stem>.yaml, built once from
    tuning_db/."""
    from sparsegen.emit import build_package, load_package
    from sparsegen.plan import make_plan
    from sparsegen.spec import load_spec
    from sparsegen.tune.db import TuningDB

    if spec_stem not in _PACKAGES:
        # the committed database wherever the bench is run from, unless the caller names one
        db = TuningDB(os.environ.get("SPARSEGEN_TUNING_DB") or ROOT / "tuning_db")
        if not db.root.is_dir():  # a mistyped path would time every kernel's default silently
            raise SystemExit(f"bench: no tuning database at {db.root} "
                             "($SPARSEGEN_TUNING_DB); give it the directory")
        spec = load_spec(ROOT / "examples" / "specs" / f"{spec_stem}.yaml")
        pkg = build_package(make_plan(spec), Path(tempfile.mkdtemp(prefix="sg-bench-")), db)
        _PACKAGES[spec_stem] = spec, load_package(pkg)
    return _PACKAGES[spec_stem]


def tuned_rule_configs(statics: dict, spec_stems, batch: int, seq_len: int,
                       adapters: dict | None = None):
    """The rule-kernel configs the emitted modules of spec_stems run at (batch, seq_len) on
    this GPU (their nearest tuned bucket), for the kernels whose statics ({name: static})
    equal an example's (the first such example in spec_stems) and, where `adapters`
    ({name: adapter class}) names one, whose adapter is the example's too (a config tuned for
    another kernel of the same statics is not this one's); the others are left out (they run
    their defaults). Returns ({name: config}, {name: example spec stem})."""
    from sparsegen.codegen.rule_kernels import rule_kernels
    from sparsegen.tune.db import torch_gpu

    configs, source = {}, {}
    for stem in spec_stems:
        spec, mod = emitted(stem)
        same = {name for name, cls, static in rule_kernels(spec)
                if statics.get(name) == static and name not in configs
                and (adapters or {}).get(name, cls) is cls}
        tuned = mod.rule_kernel_configs(torch_gpu().slug, batch, seq_len)
        for name in same & set(tuned):
            configs[name], source[name] = tuned[name], stem
    return configs, source


def emitted_attention(static, spec_stems):
    """(attend, description) for the first example spec in spec_stems whose decode attention
    has these statics (a sparsegen.codegen.decode_api.DecodeStatic): its emitted
    SparseDecodeAttention, which picks the nearest tuned bucket on every call; None when no
    example has them. attend takes the Triton adapter's keywords (k, v, ...)."""
    from sparsegen.plan import make_plan

    for stem in spec_stems:
        spec, mod = emitted(stem)
        if make_plan(spec).kernels[0].static != static:
            continue
        module = mod.SparseDecodeAttention()

        def attend(q, k, v, block_indices, block_counts, seq_lens, block_table=None):
            return module(q, k, v, block_indices, block_counts, seq_lens, block_table)
        attend.module = module
        return attend, f"emitted {stem} module (tuned bucket)"
    return None
