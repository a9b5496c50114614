"""`sparsegen build`: write an importable Python package for a spec's decode attention.

The package (`<out>/<spec name>/`) holds
  __init__.py          an nn.Module, `SparseDecodeAttention`, rendered from
                       templates/module/__init__.py.j2
  tuned_configs.json   per GPU, the tuned config of each shape bucket (from tuning_db/),
                       and the default config used where none is tuned; the same for the
                       rule's scoring / selection kernels ("rule_kernels")
  kernels/             the rendered kernel source of every config the module may use
  spec.yaml            the normalized spec it was built from

It needs no GPU to build (CI builds it from the committed tuning_db/). At run time it
imports torch and sparsegen: on CUDA, sparsegen's adapter loads the kernel file for the
config of the nearest tuned bucket; without CUDA, sparsegen's torch reference runs, so the
same model code works everywhere.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import keyword
import re
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from .codegen.backend import decode_backend
from .codegen.render import render
from .errors import SparsegenError
from .plan import rule_kernel_plans
from .tune.db import (GpuId, TuningDB, identity_key, kernel_identity, library_versions,
                      nearest_bucket)
from .tune.space import Candidate, SearchSpace

MARKER = "tuned_configs.json"


def _version() -> str:
    try:
        return importlib.metadata.version("sparsegen")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


def package_name(spec_name: str) -> str:
    name = re.sub(r"\W", "_", spec_name)
    if name[0].isdigit() or keyword.iskeyword(name):
        name = "_" + name
    return name


def build_package(plan, out_dir: str | Path, db: TuningDB | None = None) -> Path:
    """Write the package for plan.spec under out_dir; returns its directory."""
    spec = plan.spec
    db = db or TuningDB()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SparsegenError(f"{out_dir} is a file, not a directory; give -o the directory "
                             "to write the package into")
    name = package_name(spec.name)
    final = out_dir / name
    if final.exists() and not (final / MARKER).is_file():
        raise SparsegenError(f"{final} exists and is not a package sparsegen built; "
                             "choose another -o directory or remove it")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    try:
        (tmp / "kernels").mkdir()
        configs = {"format": 1, "generator": f"sparsegen {_version()}", "spec": spec.name,
                   "kernels": {k.name: _kernel_configs(k, db, tmp / "kernels")
                               for k in plan.kernels},
                   "rule_kernels": {k.name: _rule_kernel_configs(k, db)
                                    for k in rule_kernel_plans(plan)}}
        (tmp / MARKER).write_text(json.dumps(configs, sort_keys=True, indent=2) + "\n")
        (tmp / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        decode = plan.kernels[0]
        (tmp / "__init__.py").write_text(render("module/__init__.py.j2", {
            "spec_name": spec.name, "package": name, "spec_source": Path(spec.source).name,
            "kernel": decode.name, "num_q_heads": decode.num_q_heads,
            "num_kv_heads": decode.num_kv_heads, "static": decode.static.as_dict(),
            "rule": spec.selection.rule, "phases": list(spec.phases), "version": _version()}))
        # swap in the new package whole: an importer never sees a half-written one
        if final.exists():
            old = out_dir / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_package(path: str | Path):
    """Import a package build_package wrote (under a name unique to its path, so two builds
    of one spec can be loaded side by side) and return the module."""
    path = Path(path)
    if not (path / MARKER).is_file() or not (path / "__init__.py").is_file():
        raise SparsegenError(f"{path} is not a package `sparsegen build` wrote (it has no "
                             f"{MARKER} and __init__.py); build one with `sparsegen build SPEC "
                             "-o DIR` and load DIR/<package>")
    name = f"emitted_{path.name}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _kernel_configs(kernel, db: TuningDB, kernels_dir: Path) -> dict:
    identity = kernel_identity(kernel)
    space = SearchSpace(kernel)
    defaults = space.defaults()
    if not defaults:
        raise SparsegenError(f"{kernel.name}: no backend of {list(kernel.backends)} has a "
                             "feasible default config; nothing to build")
    files = {}

    def kernel_file(cand: Candidate) -> str | None:
        if cand.key not in files:
            try:
                adapter = decode_backend(cand.backend)(kernel.static, cand.config, kernels_dir)
                files[cand.key] = "kernels/" + adapter.render().name
            except ValueError:  # a config today's adapter rejects: leave it out
                files[cand.key] = None
        return files[cand.key]

    def bucket(e: dict) -> dict | None:
        cand = Candidate(e["best"]["backend"], e["best"]["config"])
        if cand.backend not in kernel.backends or kernel_file(cand) is None:
            return None
        return _bucket(e, backend=cand.backend, file=files[cand.key])

    tuned = _tuned(db, identity, bucket)
    default = defaults[0]
    kernel_file(default)
    return {
        "static": kernel.static.as_dict(), "num_q_heads": kernel.num_q_heads,
        "num_kv_heads": kernel.num_kv_heads, "backends": list(kernel.backends),
        "identity_key": identity_key(identity), "templates": identity["templates"],
        "default": {"backend": default.backend, "config": default.config,
                    "file": files[default.key]},
        "tuned": tuned,
    }


def _rule_kernel_configs(kernel, db: TuningDB) -> dict:
    """A rule kernel's tuned configs per GPU and shape bucket (the decoder renders the kernel
    itself at run time; a config today's adapter rejects is left out)."""
    identity = kernel_identity(kernel)

    def bucket(e: dict) -> dict | None:
        ok = kernel.adapter.check_config(kernel.static, e["best"]["config"]) is None
        return _bucket(e) if ok else None

    return {"identity_key": identity_key(identity), "templates": identity["templates"],
            "tuned": _tuned(db, identity, bucket)}


def tuned_rule_config(plan, kernel_name: str, gpu: GpuId, batch: int, seq_len: int,
                      db: TuningDB) -> dict | None:
    """The config `sparsegen tune` found for one of a plan's rule kernels on `gpu`, from the
    tuned bucket nearest (batch, seq_len), as an emitted module picks it; None when the plan
    has no such kernel or nothing is tuned for it with today's templates."""
    kernel = next((k for k in rule_kernel_plans(plan) if k.name == kernel_name), None)
    tuned = _rule_kernel_configs(kernel, db)["tuned"].get(gpu.slug) if kernel else None
    return nearest_bucket(tuned["buckets"], batch, seq_len)["config"] if tuned else None


def _tuned(db: TuningDB, identity: dict, bucket) -> dict:
    """{gpu slug: {"gpu", "buckets"}} of the best tuned entries (_best_entries), each made a
    bucket by `bucket(entry)` (None: left out); a GPU with no bucket left is left out."""
    tuned = {}
    for gpu, entries in _best_entries(db, identity):
        buckets = [b for b in map(bucket, entries) if b is not None]
        if buckets:
            tuned[gpu["slug"]] = {"gpu": {"name": gpu["name"], "capability": gpu["capability"]},
                                  "buckets": buckets}
    return tuned


def _bucket(e: dict, **extra) -> dict:
    """One tuned shape bucket of a configs file: its shape, best config and timings."""
    return {"batch": e["shape"]["batch"], "seq_len": e["shape"]["seq_len"],
            "config": e["best"]["config"], "median_ms": e["best"]["median_ms"],
            "default_ms": e["default"]["median_ms"], "versions": e["versions"], **extra}


def _best_entries(db: TuningDB, identity: dict) -> list[tuple[dict, list]]:
    """Per GPU, one entry per shape: the one tuned with the installed library versions,
    else the most recently tuned one."""
    current = library_versions()
    by_gpu: dict = {}
    for gpu, entry in db.entries_for(identity):
        slug = GpuId(gpu["name"], gpu["capability"]).slug
        _, best = by_gpu.setdefault(slug, ({**gpu, "slug": slug}, {}))
        shape = (entry["shape"]["batch"], entry["shape"]["seq_len"])
        rank = (entry["versions"] == current, entry["tuned_at"])
        if shape not in best or rank > best[shape][0]:
            best[shape] = (rank, entry)
    return [(gpu, [best[s][1] for s in sorted(best)]) for gpu, best in by_gpu.values()]
