"""`sparsegen build`: the emitted package imports and runs on the CPU, matching the reference."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sparsegen.emit import build_package, load_package
from sparsegen.errors import SparsegenError
from sparsegen.methods.sparse_decode_ref import (BlockIndexError, dense_decode_reference,
                                               sparse_decode_reference)
from sparsegen.plan import make_plan
from sparsegen.spec import load_spec
from sparsegen.tune.db import GpuId, TuningDB, kernel_identity, library_versions
from sparsegen.tune.space import SearchSpace
from tests.decode_cases import make_case, paged_view

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "examples" / "specs"
GPU = GpuId("Fake H100", "9.0")


def build(tmp_path, spec_file: str, db: TuningDB | None = None):
    plan = make_plan(load_spec(SPECS / spec_file))
    path = build_package(plan, tmp_path / "out", db or TuningDB(tmp_path / "db"))
    return plan, path, load_package(path)


def test_contiguous_module_matches_reference_on_cpu(tmp_path):
    plan, path, pkg = build(tmp_path, "seer-attention-r.yaml")
    assert {p.name for p in path.iterdir()} >= {"__init__.py", "tuned_configs.json",
                                                "kernels", "spec.yaml"}
    configs = json.loads((path / "tuned_configs.json").read_text())
    kernel = configs["kernels"]["sparse_decode"]
    assert kernel["tuned"] == {}
    assert (path / kernel["default"]["file"]).is_file()  # the rendered default kernel
    attn = pkg.SparseDecodeAttention()
    case = make_case(2, 8, 4, 128, 64, [700, 333], 0.5, seed=1, dtype=torch.bfloat16)
    out = attn(case.q, case.k, case.v, case.block_indices, case.block_counts, case.seq_lens)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 32, 128)
    ref = sparse_decode_reference(case.q, case.k, case.v, case.block_indices,
                                  case.block_counts, case.seq_lens, 64)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    # every block selected: the dense reference, an independent path
    full = make_case(2, 8, 4, 128, 64, [700, 333], 1.0, seed=2, dtype=torch.bfloat16)
    out = attn(full.q, full.k, full.v, full.block_indices, full.block_counts, full.seq_lens)
    dense = dense_decode_reference(full.q, full.k, full.v, full.seq_lens)
    torch.testing.assert_close(out.float(), dense, atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match=r"q must be \[B, 32, 128\]"):
        attn(case.q[:, :16], case.k, case.v, case.block_indices, case.block_counts,
             case.seq_lens)
    # a selection or cache of another batch would be read past its end on the GPU
    with pytest.raises(ValueError, match="for q of batch 1"):
        attn(case.q[:1], case.k, case.v, case.block_indices, case.block_counts, case.seq_lens)
    with pytest.raises(ValueError, match="q has batch 1 and k_cache 2"):
        attn(case.q[:1], case.k, case.v, case.block_indices[:1], case.block_counts[:1],
             case.seq_lens[:1])
    with pytest.raises(ValueError, match="must share a dtype"):
        attn(case.q.float(), case.k, case.v, case.block_indices, case.block_counts,
             case.seq_lens)
    with pytest.raises(BlockIndexError, match="the tokens the cache holds"):
        attn(case.q, case.k, case.v, case.block_indices, case.block_counts,
             case.seq_lens + case.k.shape[1])


def test_paged_module_matches_reference_on_cpu(tmp_path):
    _, _, pkg = build(tmp_path, "quest-topk.yaml")
    attn = pkg.SparseDecodeAttention()
    case = make_case(3, 8, 4, 128, 16, [200, 97, 16], 0.4, seed=3, dtype=torch.float16)
    k_pages, v_pages, table = paged_view(case.k, case.v, 16, seed=4)
    out = attn(case.q, k_pages, v_pages, case.block_indices, case.block_counts, case.seq_lens,
               block_table=table)
    ref = sparse_decode_reference(case.q, case.k, case.v, case.block_indices,
                                  case.block_counts, case.seq_lens, 16)  # contiguous view
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="block_table"):
        attn(case.q, k_pages, v_pages, case.block_indices, case.block_counts, case.seq_lens)


def _fake_cuda(monkeypatch, gpu: GpuId):
    """torch.cuda reporting `gpu` for every device, so the runtime GPU lookup runs on CPU."""
    major, minor = map(int, gpu.capability.split("."))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu.name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))


def test_tuned_configs_nearest_bucket_and_default_elsewhere(tmp_path, monkeypatch):
    spec_file = "seer-attention-r.yaml"
    plan = make_plan(load_spec(SPECS / spec_file))
    kernel = plan.kernels[0]
    space = SearchSpace(kernel)
    default = space.defaults()[0]
    # a feasible config other than the default, of the other backend
    other = space.defaults()[1]
    db = TuningDB(tmp_path / "db")
    for b, s in ((1, 8192), (16, 131072)):
        db.record(GPU, kernel_identity(kernel), {
            "shape": {"batch": b, "seq_len": s}, "selected_blocks": 64,
            "versions": library_versions(),
            "best": {"backend": other.backend, "config": other.config, "median_ms": 0.02,
                     "plain_ms": 0.05, "graph_ms": 0.02, "bandwidth_gbs": 2000.0},
            "default": {"backend": default.backend, "config": default.config,
                        "median_ms": 0.03},
            "trials": {"measured": 10, "failed": 0, "infeasible": 0}, "study": "t",
            "tuned_at": "2026-01-01T00:00:00Z"})
    _, path, pkg = build(tmp_path, spec_file, db)
    tuned = json.loads((path / "tuned_configs.json").read_text())["kernels"]["sparse_decode"]
    buckets = tuned["tuned"][GPU.slug]["buckets"]
    assert [(b["batch"], b["seq_len"]) for b in buckets] == [(1, 8192), (16, 131072)]
    assert all((path / b["file"]).is_file() for b in buckets)
    backend, config, source = pkg.pick_config(GPU.slug, 12, 100000)
    assert (backend, config) == (other.backend, other.config) and "b16_s131072" in source
    assert pkg.pick_config(GPU.slug, 1, 4096)[2].endswith("b1_s8192")
    assert pkg.pick_config("some-other-gpu-sm80", 12, 100000)[:2] == (default.backend,
                                                                    default.config)
    # at run time the module keys its GPU the way the tuning database does (sparsegen's GpuId)
    assert pkg._gpu_slug("cpu") is None
    _fake_cuda(monkeypatch, GPU)
    assert pkg._gpu_slug("cuda:0") == GPU.slug
    # templates changed since the build: the tuned configs no longer apply
    pkg._templates_current = lambda: False
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert pkg.pick_config(GPU.slug, 12, 100000)[2] == "default"
    assert "templates or adapters changed" in str(w[0].message)


def test_build_cli_and_refusals(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sparsegen.cli", "build", str(SPECS / "raas-milestone.yaml"),
           "-o", str(out), "--db", str(tmp_path / "db")]
    for _ in range(2):  # building again replaces the package
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "no tuned configs" in r.stdout
        # the database named does not exist (a typo?): the message says where it looked
        assert f"no tuning database at {tmp_path / 'db'}" in r.stdout
    (tmp_path / "db").mkdir()   # an empty database is simply untuned
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "no tuned configs" in r.stdout and "no tuning database" not in r.stdout
    assert (out / "raas_milestone" / "__init__.py").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers
    (tmp_path / "mine" / "raas_milestone").mkdir(parents=True)
    plan = make_plan(load_spec(SPECS / "raas-milestone.yaml"))
    with pytest.raises(SparsegenError, match="not a package sparsegen built"):
        build_package(plan, tmp_path / "mine", TuningDB(tmp_path / "db"))
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(SparsegenError, match="is a file, not a directory"):
        build_package(plan, tmp_path / "a_file", TuningDB(tmp_path / "db"))
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_tuned_rule_kernel_configs_reach_the_layers_decoder(tmp_path):
    """A tuned block_select config is carried in tuned_configs.json, picked by nearest bucket
    for the GPU the layer runs on, and handed to the rule's decoder; a config today's adapter
    rejects is left out."""
    from sparsegen.methods.decoders import make_cache, make_decoder
    from sparsegen.plan import rule_kernel_plans

    spec_file = "quest-topk.yaml"
    plan = make_plan(load_spec(SPECS / spec_file))
    select = {k.name: k for k in rule_kernel_plans(plan)}["block_select"]
    default = select.adapter.default_config(select.static)
    small = {**default, "algo": "radix8", "chunk": 128, "num_warps": 2}
    big = {**default, "algo": "tilelang", "num_warps": 16}
    bad = {**default, "chunk": 3}
    assert select.adapter.check_config(select.static, small) is None
    assert select.adapter.check_config(select.static, big) is None
    assert select.adapter.check_config(select.static, bad) is not None
    db = TuningDB(tmp_path / "db")
    for (b, s), cfg in (((1, 8192), small), ((16, 131072), big), ((8, 32768), bad)):
        db.record(GPU, kernel_identity(select), {
            "shape": {"batch": b, "seq_len": s}, "selected_blocks": 64,
            "versions": library_versions(),
            "best": {"backend": "triton", "config": cfg, "median_ms": 0.01,
                     "plain_ms": 0.02, "graph_ms": 0.01, "bandwidth_gbs": 100.0},
            "default": {"backend": "triton", "config": default, "median_ms": 0.02},
            "trials": {"measured": 8, "failed": 0, "infeasible": 0}, "study": "t",
            "tuned_at": "2026-01-01T00:00:00Z"})
    _, path, pkg = build(tmp_path, spec_file, db)
    rules = json.loads((path / "tuned_configs.json").read_text())["rule_kernels"]
    assert set(rules) == {"quest_meta", "quest_score", "block_select"}
    buckets = rules["block_select"]["tuned"][GPU.slug]["buckets"]
    assert [(x["batch"], x["seq_len"]) for x in buckets] == [(1, 8192), (16, 131072)]
    assert rules["quest_meta"]["tuned"] == {}
    assert pkg.rule_kernel_configs(GPU.slug, 12, 100000) == {"block_select": big}
    assert pkg.rule_kernel_configs(GPU.slug, 1, 4096) == {"block_select": small}
    assert pkg.rule_kernel_configs("other-gpu-sm80", 12, 100000) == {}
    assert pkg.rule_kernel_configs(None, 12, 100000) == {}
    layer = pkg.SparseAttentionLayer(2, 512, dtype=torch.float32)  # CPU: no GPU, no tuning
    assert layer.kernel_configs == {}
    spec = load_spec(SPECS / spec_file)
    cache = make_cache(spec, 2, 512, dtype=torch.float32)
    decoder = make_decoder(spec, cache, impl="torch", kernel_configs={"block_select": big})
    assert decoder._kernel_configs == {"block_select": big}


def _other_config(adapter, static) -> dict:
    """A feasible config of the adapter that differs from its default."""
    import itertools

    default = adapter.default_config(static)
    space = adapter.tunable_space(static)
    for values in itertools.product(*space.values()):
        cfg = {**default, **dict(zip(space, values))}
        if cfg != default and adapter.check_config(static, cfg) is None:
            return cfg
    raise AssertionError(f"{adapter.__name__} has no feasible config besides its default")


@pytest.mark.parametrize("spec_file,kernels", [
    ("seer-attention-r.yaml", ("gate_step", "gate_score", "block_select")),
    ("quest-topk.yaml", ("quest_meta", "quest_score", "block_select")),
    ("dash-entmax.yaml", ("entmax_tau", "entmax_prefill")),
    ("raas-milestone.yaml", ("milestone_score", "milestone_select")),
])
def test_every_rule_kernel_runs_its_tuned_config(spec_file, kernels):
    """make_decoder hands each decode-step kernel of the rule its own tuned config (the
    kernel objects the triton path builds carry it). entmax_decode is the layer's attend:
    its config is handed over in the emitted module's _attend on CUDA only."""
    from sparsegen.methods.decoders import make_cache, make_decoder
    from sparsegen.plan import rule_kernel_plans

    spec = load_spec(SPECS / spec_file)
    plans = {k.name: k for k in rule_kernel_plans(make_plan(spec))}
    tuned = {n: _other_config(plans[n].adapter, plans[n].static) for n in kernels}
    cache = make_cache(spec, 2, 512)
    dec = make_decoder(spec, cache, impl="triton", kernel_configs=tuned)
    built = {}
    if spec.selection.rule == "gate":
        built = {"gate_step": dec.step_kernels(cache.k.dtype), "gate_score": dec.kernels.score,
                 "block_select": dec.kernels.select}
    elif spec.selection.rule == "topk":
        meta, select = dec.kernels(cache)
        built = {"quest_meta": meta, "quest_score": select.score,
                 "block_select": select.select}
    elif spec.selection.rule == "entmax":
        built = {"entmax_tau": dec.selector, "entmax_prefill": dec.prefill_kernel.__self__}
    else:
        built = {"milestone_score": dec.scorer, "milestone_select": dec.selector}
    for name in kernels:
        assert type(built[name]) is plans[name].adapter, name
        assert built[name].static == plans[name].static, name
        assert built[name].config == tuned[name], name


def test_compile_covers_every_tuned_rule_kernel_config():
    """`sparsegen compile` (the main job) compiles each rule kernel at its default and at every
    distinct config the committed database holds for it: what an emitted decoder may render
    (here the entmax tau kernel, whose tuned configs run TileLang and Triton)."""
    from sparsegen.cli import _configs_to_compile
    from sparsegen.emit import _best_entries
    from sparsegen.plan import rule_kernel_plans

    db = TuningDB(ROOT / "tuning_db")
    plan = make_plan(load_spec(SPECS / "dash-entmax.yaml"))
    tau = next(k for k in rule_kernel_plans(plan) if k.name == "entmax_tau")
    default = tau.adapter.default_config(tau.static)
    configs = [c for _, c in _configs_to_compile(tau, [("triton", default)], db)]
    assert configs[0] == tau.adapter.default_config(tau.static)
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    tuned = [e["best"]["config"] for _, es in _best_entries(db, kernel_identity(tau)) for e in es]
    assert tuned and all(c in configs for c in tuned)
    assert {c["algo"] for c in configs} == {"triton", "tilelang"}
