"""The tuner on the CPU: fake adapters and a CPU objective stand in for kernels and GPU."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sparsegen.codegen.backend import _ADAPTERS
from sparsegen.errors import SparsegenError
from sparsegen.tune import tuner as tuner_mod
from sparsegen.tune.db import GpuId, TuningDB, kernel_identity, library_versions
from sparsegen.tune.space import CONSTRAINT, Candidate, SearchSpace
from sparsegen.tune.tuner import Targets, TuneOptions, open_storage, study_name, tune_plan
from sparsegen.tune.worker import ChildWorker
from tests import tune_fakes
from tests.tune_fakes import (FakeDecode, FakePlan, FakeRule, FakeRuleNoBench, FakeRuleStatic,
                              cost, fake_kernel)

ROOT = Path(__file__).resolve().parents[1]
GPU = GpuId("Fake GPU", "9.0")


class FakeFailing(FakeDecode):
    """A space small enough to be evaluated whole, holding every kind of failure
    (with FAKE_FAILURES=1): (16,1) oom, (16,8) hang, (32,1) compile error, (64,8) wrong
    result, (128,1) segfault; (32,8), (64,1) and (128,8) work."""

    name = "fakefail"

    @classmethod
    def tunable_space(cls, static):
        return {"tile": [16, 32, 64, 128], "warps": [1, 8], "stages": [1]}

    @classmethod
    def default_config(cls, static):
        return {"tile": 128, "warps": 8, "stages": 1}


_ADAPTERS.setdefault("fakefail", ("tests.test_tuner", "FakeFailing"))


class FakeForms(FakeDecode):
    """Two forms under `algo`, each with values of its own: a takes tiles <= 32 and one
    lane, b tiles >= 64 and four lanes (and FakeDecode's tile x stages bound)."""

    name = "fakeforms"

    @classmethod
    def tunable_space(cls, static):
        return {"algo": ["a", "b"], "tile": [16, 32, 64, 128], "warps": [1, 2, 4, 8],
                "stages": [1, 2], "lanes": [1, 4]}

    @classmethod
    def default_config(cls, static):
        return {"algo": "a", "tile": 32, "warps": 2, "stages": 2, "lanes": 1}

    @classmethod
    def check_config(cls, static, config):
        if config["algo"] == "a" and (config["tile"] > 32 or config["lanes"] != 1):
            return "form a takes tiles <= 32 and one lane"
        if config["algo"] == "b" and (config["tile"] < 64 or config["lanes"] != 4):
            return "form b takes tiles >= 64 and four lanes"
        return super().check_config(static, config)


_ADAPTERS.setdefault("fakeforms", ("tests.test_tuner", "FakeForms"))


def options(tmp_path, **kw) -> TuneOptions:
    kw.setdefault("trials", 8)
    return TuneOptions(gpu=GPU, db=TuningDB(tmp_path / "db"), timeout_s=kw.pop("timeout_s", 5.0),
                       workers=kw.pop("workers", 2), cache_dir=tmp_path / "cache",
                       targets=Targets(**tune_fakes.TARGETS), stream=io.StringIO(), **kw)


def evaluations(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "evaluate"]


def load_study(tmp_path, kernel, shape) -> optuna.Study:
    name = study_name(kernel_identity(kernel), shape, GPU, library_versions())
    return optuna.load_study(study_name=name, storage=open_storage(None, tmp_path / "cache"))


@pytest.fixture
def fake_log(tmp_path, monkeypatch):
    log = tmp_path / "evals.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    return log


def test_space_defaults_and_static_feasibility():
    space = SearchSpace(fake_kernel())
    assert [c.backend for c in space.defaults()] == ["fake", "fake2"]
    assert space.defaults()[0].config == {"tile": 32, "warps": 2, "stages": 2}
    bad = space.from_params({"backend": "fake", "fake.tile": 128, "fake.warps": 4,
                             "fake.stages": 2})
    assert "exceeds shared memory" in space.infeasibility(bad)
    # fake: 4*4*3 = 48 configs, 8 with tile 128 and stages >= 2 infeasible; fake2: 3
    assert space.feasible_count() == 40 + 3
    cand = space.defaults()[1]
    assert space.from_params(space.params(cand)) == cand and cand.key == space.from_params(
        space.params(cand)).key


def test_space_branches_on_algo():
    """A backend with an `algo` key: a trial draws the form first, then only the values some
    feasible config of that form takes (fixed keys as one-choice params); params round-trip
    under the branched names, and flat params (studies recorded before) still parse."""
    space = SearchSpace(fake_kernel(backends=("fakeforms",)))
    assert space.branches("fakeforms") == {
        "a": {"tile": [16, 32], "warps": [1, 2, 4, 8], "stages": [1, 2], "lanes": [1]},
        "b": {"tile": [64, 128], "warps": [1, 2, 4, 8], "stages": [1, 2], "lanes": [4]}}
    assert SearchSpace(fake_kernel()).branches("fake") is None   # no algo key
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    reasons = []
    for _ in range(60):
        trial = study.ask()
        cand = space.suggest(trial)
        reasons.append(space.infeasibility(cand))
        study.tell(trial, 1.0)
    assert {c.params["fakeforms/algo"] for c in study.trials} == {"a", "b"}
    # only the cross-key bound is left to reject (tile 128 x stages 2 under b)
    assert {r for r in reasons if r} <= {"tile*stages=256 exceeds shared memory"}
    assert reasons.count(None) >= 45
    cand = Candidate("fakeforms", {"algo": "b", "tile": 64, "warps": 4, "stages": 1,
                                   "lanes": 4})
    params = space.params(cand)
    assert params == {"backend": "fakeforms", "fakeforms/algo": "b", "fakeforms/b.tile": 64,
                      "fakeforms/b.warps": 4, "fakeforms/b.stages": 1, "fakeforms/b.lanes": 4}
    assert space.from_params(params).key == cand.key
    flat = {"backend": "fakeforms", **{f"fakeforms.{k}": v for k, v in cand.config.items()}}
    assert space.from_params(flat).key == cand.key
    assert space.feasible_count() == 2 * 4 * 2 + (4 * 2 + 4 * 1)   # a: 16; b: 8 + 4


def test_tune_over_a_branched_space(tmp_path, fake_log):
    """A whole CPU tune over forms: the default (form a) enqueued first under the branched
    names, the winner form b's best (tile 64, 4 warps, 1 stage: the fake cost's minimum)."""
    kernel = fake_kernel(backends=("fakeforms",), shapes=((2, 2048),))
    (r,) = tune_plan(FakePlan(kernel), options(tmp_path, trials=16))
    assert r.status == "tuned"
    trials = load_study(tmp_path, kernel, kernel.shapes[0]).get_trials()
    assert trials[0].params["fakeforms/algo"] == "a"
    assert all("fakeforms/algo" in t.params for t in trials)
    infeasible = [t for t in trials if t.user_attrs.get("outcome") == "infeasible"]
    assert all("exceeds shared memory" in t.user_attrs["reason"] for t in infeasible)
    assert r.entry["best"]["config"]["algo"] in ("a", "b")
    assert r.entry["best"]["median_ms"] <= r.entry["default"]["median_ms"]


def test_tune_enqueues_defaults_first_and_reports_infeasible_on_cpu(tmp_path, fake_log):
    kernel = fake_kernel(shapes=((2, 2048),))
    (r,) = tune_plan(FakePlan(kernel), options(tmp_path, trials=12))
    assert r.status == "tuned"
    study = load_study(tmp_path, kernel, kernel.shapes[0])
    trials = study.get_trials()
    assert SearchSpace.from_params(trials[0].params).config == {"tile": 32, "warps": 2, "stages": 2}
    assert trials[1].params == {"backend": "fake2", "fake2.chunk": 16}
    infeasible = [t for t in trials if t.user_attrs.get("outcome") == "infeasible"]
    for t in infeasible:  # decided on the CPU: a constraint, pruned, never evaluated
        assert t.state == TrialState.PRUNED and t.constraints[CONSTRAINT] > 0
        assert "exceeds shared memory" in t.user_attrs["reason"]
    evaluated = {(e["trial"]) for e in evaluations(fake_log)}
    assert not evaluated & {t.number for t in infeasible}
    measured = [t for t in trials if t.user_attrs.get("outcome") == "measured"]
    assert 12 <= len(measured) <= 13 and len(measured) == len(evaluated)  # overshoot: <= 1
    # the winner is the best measured, never worse than the default
    best = r.entry["best"]
    assert best["median_ms"] == pytest.approx(min(t.value for t in measured))
    assert best["median_ms"] <= r.entry["default"]["median_ms"] == pytest.approx(cost(
        "fake", {"tile": 32, "warps": 2, "stages": 2}))
    assert r.entry["trials"] == {"measured": len(measured), "failed": 0,
                                 "infeasible": len(infeasible)}


def test_rule_kernels_are_tuned_per_shape_and_recorded(tmp_path, fake_log, monkeypatch):
    """plan.rule_kernels get a study per shape bucket of the spec, through the same path:
    default enqueued first, check_config rejections pruned on the CPU, winners in the db
    under the rule kernel's own identity; an adapter without bench_inputs is skipped."""
    from sparsegen.plan import rule_kernel_plans

    kernel = fake_kernel(shapes=((1, 1024), (4, 4096)))
    plan = FakePlan(kernel, rule_kernels=(
        ("fake_select", FakeRule, FakeRuleStatic(64)),
        ("fake_step", FakeRuleNoBench, FakeRuleStatic(64))))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    results = tune_plan(plan, options(tmp_path, trials=6))
    tuner_mod.print_summary(results)
    by = {(r.kernel, r.shape): r for r in results}
    assert by[("fake_step", "-")].status == "skipped"
    assert "skipped fake_step: FakeRuleNoBench has no bench_inputs" in out.getvalue()
    rule, _ = rule_kernel_plans(plan)
    assert rule.shapes == kernel.shapes and rule.bench_kwargs(kernel.shapes[1]) == {
        "heads": 2, "budget_blocks": kernel.selected_blocks(4096)}
    identity = kernel_identity(rule)
    assert identity["name"] == "fake_select" and identity["static"] == {"block_size": 64,
                                                                        "rows": 1}
    assert identity["templates"]["triton"]["adapter"] == "tests.tune_fakes"
    assert identity["templates"]["triton"]["adapter_hash"]
    db = TuningDB(tmp_path / "db")
    n_measured = 0
    for shape in kernel.shapes:
        r = by[("fake_select", shape.key)]
        assert r.status == "tuned"
        study = load_study(tmp_path, rule, shape)
        trials = study.get_trials()
        assert trials[0].user_attrs["default"] and trials[0].params == {
            "backend": "triton", "triton.block": 32, "triton.num_warps": 2}
        infeasible = [t for t in trials if t.user_attrs.get("outcome") == "infeasible"]
        for t in infeasible:
            assert t.state == TrialState.PRUNED and t.constraints[CONSTRAINT] > 0
            assert "exceeds registers" in t.user_attrs["reason"]
        measured = [t for t in trials if t.user_attrs.get("outcome") == "measured"]
        # the budget: 6, or one more where the two workers raced for the last slot (the
        # tuner's documented overshoot, never an undershoot)
        assert 6 <= len(measured) <= 7 and r.entry["trials"]["measured"] == len(measured)
        n_measured += len(measured)
        assert r.entry["best"]["median_ms"] == pytest.approx(min(t.value for t in measured))
        assert r.entry["default"]["median_ms"] == pytest.approx(
            cost("triton", {"block": 32, "num_warps": 2}))
        assert r.entry["trials"]["infeasible"] == len(infeasible)
        entry = db.lookup(GPU, identity, {"batch": shape.batch, "seq_len": shape.seq_len},
                          library_versions())
        assert entry["best"] == r.entry["best"]
    assert db.path_for(GPU, identity).name.startswith("fake_select-")
    # rule-kernel evaluations got their own workload and static class
    rule_evals = [e for e in evaluations(fake_log) if "block" in e["config"]]
    assert len(rule_evals) == n_measured
    # the attention kernel is tuned as before, and a second run is warm throughout
    assert all(by[("fake_decode", s.key)].status == "tuned" for s in kernel.shapes)
    again = tune_plan(plan, options(tmp_path, trials=6))
    assert sorted(r.status for r in again) == ["skipped"] + ["warm"] * 4


def test_an_adapters_seeds_are_measured_after_the_default(tmp_path, fake_log):
    """seed_configs: the feasible seeds in the space are enqueued right after the default
    (an infeasible one or one outside the space is left out)."""
    from sparsegen.plan import rule_kernel_plans

    kernel = fake_kernel(shapes=((1, 1024),))
    plan = FakePlan(kernel, rule_kernels=(("fake_seeded", tune_fakes.FakeRuleSeeded,
                                           FakeRuleStatic(64)),))
    results = tune_plan(plan, options(tmp_path, trials=4, workers=1, kernels=("fake_seeded",)))
    assert [r.status for r in results] == ["tuned"]
    (rule,) = rule_kernel_plans(plan)
    trials = load_study(tmp_path, rule, kernel.shapes[0]).get_trials()
    first = [(t.params["triton.block"], t.params["triton.num_warps"]) for t in trials[:3]]
    assert first == [(32, 2), (128, 1), (16, 4)]
    assert trials[1].user_attrs["seed"] and trials[2].user_attrs["seed"]


def test_tune_only_the_named_kernels_and_shapes(tmp_path, fake_log):
    """--kernels / --shapes narrow a run to what is missing (a spot re-tune costs only its
    own GPU time); a name the plan lacks is one clear error before any work."""
    kernel = fake_kernel(shapes=((1, 1024), (4, 4096)))
    plan = FakePlan(kernel, rule_kernels=(("fake_select", FakeRule, FakeRuleStatic(64)),))
    results = tune_plan(plan, options(tmp_path, trials=3, kernels=("fake_select",),
                                      shapes=("b4_s4096",)))
    assert [(r.kernel, r.shape, r.status) for r in results] == [
        ("fake_select", "b4_s4096", "tuned")]
    assert all("block" in e["config"] for e in evaluations(fake_log))  # no attention trial
    again = tune_plan(plan, options(tmp_path, trials=3))
    assert sorted((r.kernel, r.shape, r.status) for r in again) == [
        ("fake_decode", "b1_s1024", "tuned"), ("fake_decode", "b4_s4096", "tuned"),
        ("fake_select", "b1_s1024", "tuned"), ("fake_select", "b4_s4096", "warm")]
    with pytest.raises(SparsegenError, match="--kernels nope: not in this spec's plan; its "
                                             "kernels are fake_decode, fake_select"):
        tune_plan(plan, options(tmp_path, kernels=("nope",)))
    with pytest.raises(SparsegenError, match="--shapes b9_s9: no such bucket for the chosen "
                                             "kernels; they have b1_s1024, b4_s4096"):
        tune_plan(plan, options(tmp_path, shapes=("b9_s9",)))


def test_rule_kernel_gate_compares_with_the_reference():
    import torch

    from sparsegen.tune.bench import _check_rule
    from sparsegen.tune.worker import CandidateError

    idx = torch.tensor([[0, 2, -1]], dtype=torch.int32)
    logits = torch.tensor([1.0, float("-inf"), 2.0])
    assert _check_rule(torch, (idx, logits), (idx.clone(), logits.double()), 1e-2, "c") == 0
    with pytest.raises(CandidateError, match="differs from the reference"):
        _check_rule(torch, (idx + 1, logits), (idx, logits), 1e-2, "c")
    with pytest.raises(CandidateError, match="non-finite"):
        _check_rule(torch, (idx, logits.nan_to_num(neginf=0.0)), (idx, logits), 1e-2, "c")
    with pytest.raises(CandidateError, match="relative error"):
        _check_rule(torch, (idx, logits * 1.1), (idx, logits), 1e-2, "c")


def test_failed_children_are_failed_trials_and_tuning_goes_on(tmp_path, fake_log, monkeypatch):
    monkeypatch.setenv("FAKE_FAILURES", "1")
    kernel = fake_kernel(backends=("fakefail",), shapes=((1, 1024),))
    t0 = time.monotonic()
    (r,) = tune_plan(FakePlan(kernel), options(tmp_path, trials=20, timeout_s=2.0))
    assert time.monotonic() - t0 < 60
    study = load_study(tmp_path, kernel, kernel.shapes[0])
    failed = {(t.params["fakefail.tile"], t.params["fakefail.warps"]):
              (t.user_attrs["fail_kind"], t.user_attrs["reason"])
              for t in study.get_trials(states=(TrialState.FAIL,))
              if t.user_attrs.get("outcome") == "failed"}
    assert failed[(16, 1)][0] == "oom" and "out of memory" in failed[(16, 1)][1]
    assert failed[(16, 8)][0] == "timeout" and "2 s" in failed[(16, 8)][1]
    assert failed[(32, 1)][0] == "compile" and "fake compile error" in failed[(32, 1)][1]
    assert failed[(64, 8)][0] == "wrong" and "relative error" in failed[(64, 8)][1]
    assert failed[(128, 1)][0] == "crash" and "SIGSEGV" in failed[(128, 1)][1]
    assert len(failed) == 5
    # the whole space (8 candidates) was evaluated once, then the study stopped
    assert r.status == "tuned" and r.entry["trials"]["measured"] == 3
    assert r.entry["trials"]["failed"] == 5
    assert r.entry["best"]["config"] == {"tile": 64, "warps": 1, "stages": 1}
    assert r.entry["default"]["median_ms"] == pytest.approx(
        cost("fake", {"tile": 128, "warps": 8, "stages": 1}))


def test_a_warm_database_does_no_gpu_work(tmp_path, fake_log, monkeypatch):
    plan = FakePlan(fake_kernel())
    first = tune_plan(plan, options(tmp_path, trials=4))
    assert [r.status for r in first] == ["tuned", "tuned"]
    n = len(evaluations(fake_log))

    def no_session(*a, **k):
        raise AssertionError("a warm database must not start workers")

    monkeypatch.setattr(tuner_mod, "_Session", no_session)
    t0 = time.monotonic()
    second = tune_plan(plan, options(tmp_path, trials=4))
    assert time.monotonic() - t0 < 5
    assert [r.status for r in second] == ["warm", "warm"]
    assert [{k: v for k, v in r.entry.items() if k != "checksum"} for r in second] == \
        [r.entry for r in first]
    assert len(evaluations(fake_log)) == n


def test_retune_measures_the_recorded_winner_again_and_never_gets_worse(tmp_path, fake_log):
    kernel = fake_kernel(shapes=((2, 2048),))
    plan = FakePlan(kernel)
    (first,) = tune_plan(plan, options(tmp_path, trials=3))
    assert tune_plan(plan, options(tmp_path, trials=12))[0].status == "warm"  # no --retune
    # another machine (a fresh study journal), the same database, a larger budget
    opts = options(tmp_path, trials=12, retune=True)
    opts.cache_dir = tmp_path / "cache2"
    (second,) = tune_plan(plan, opts)
    assert second.status == "tuned"
    name = study_name(kernel_identity(kernel), kernel.shapes[0], GPU, library_versions())
    study = optuna.load_study(study_name=name, storage=open_storage(None, tmp_path / "cache2"))
    # the old winner is among the measured trials (enqueued, unless it is a default: the
    # defaults are enqueued first and a repeat is skipped)
    old = (first.entry["best"]["backend"], first.entry["best"]["config"])
    (prior,) = [t for t in study.get_trials() if t.user_attrs.get("prior")
                or (t.user_attrs.get("default")
                    and (SearchSpace.from_params(t.params).backend,
                         SearchSpace.from_params(t.params).config) == old)]
    cand = SearchSpace.from_params(prior.params)
    assert (cand.backend, cand.config) == old
    assert prior.user_attrs["outcome"] == "measured"
    assert second.entry["best"]["median_ms"] <= prior.value
    assert second.entry["best"]["median_ms"] <= first.entry["best"]["median_ms"] + 1e-9
    assert len([t for t in study.get_trials() if t.user_attrs.get("outcome") == "measured"]) >= 12
    # the database holds the new entry in place of the old one, nothing else changed
    recorded = TuningDB(tmp_path / "db").lookup(GPU, kernel_identity(kernel),
                                                {"batch": 2, "seq_len": 2048},
                                                library_versions())
    assert recorded["study"] == second.entry["study"] and recorded["tuned_at"] == \
        second.entry["tuned_at"] and recorded["best"] == second.entry["best"]


def test_retune_searches_without_a_winner_the_space_no_longer_holds(tmp_path, fake_log):
    kernel = fake_kernel(shapes=((2, 2048),))
    plan = FakePlan(kernel)
    (first,) = tune_plan(plan, options(tmp_path, trials=3))
    # a winner recorded by an older sparsegen whose space had tile 48
    entry = {k: v for k, v in first.entry.items() if k != "checksum"}
    entry["best"] = {**entry["best"], "backend": "fake",
                     "config": {"tile": 48, "warps": 2, "stages": 2}}
    TuningDB(tmp_path / "db").record(GPU, kernel_identity(kernel), entry)
    opts = options(tmp_path, trials=4, retune=True)
    opts.cache_dir = tmp_path / "cache2"
    (second,) = tune_plan(plan, opts)
    assert second.status == "tuned"
    assert "not in today's space" in opts.stream.getvalue()
    assert second.entry["best"]["config"] != {"tile": 48, "warps": 2, "stages": 2}


def test_a_changed_kernel_is_seeded_with_its_previous_versions_winner(tmp_path, fake_log):
    """After a template edit (a new identity, the old file stale) the old winner is measured
    first, at each choice of a config key added since; entries of other kernels, statics or
    shapes, and files that do not load, seed nothing."""
    kernel = fake_kernel(shapes=((2, 2048), (4, 4096)))
    identity = kernel_identity(kernel)
    db = TuningDB(tmp_path / "db")
    old_identity = {**identity, "templates": {"fake": {"path": "x.j2", "hash": "0ld"}}}
    other_static = {**old_identity, "static": {**identity["static"], "head_dim": 8}}
    entry = {"shape": {"batch": 2, "seq_len": 2048}, "selected_blocks": 1,
             "versions": library_versions(), "trials": {"measured": 8, "failed": 0,
                                                        "infeasible": 0},
             "best": {"backend": "fake", "config": {"tile": 64, "warps": 4},  # no "stages" yet
                      "median_ms": 1.0, "plain_ms": None, "graph_ms": None,
                      "bandwidth_gbs": None},
             "default": {"backend": "fake", "config": {"tile": 32, "warps": 2},
                         "median_ms": 2.0},
             "study": "old", "tuned_at": "2026-01-01T00:00:00Z"}
    db.record(GPU, old_identity, entry)
    db.record(GPU, other_static, {**entry, "best": {**entry["best"],
                                                    "config": {"tile": 16, "warps": 1}}})
    stray = db.path_for(GPU, identity).with_name("fake-0123456789abcdef.json")
    stray.write_text("{not json")
    assert db.predecessor(GPU, identity, {"batch": 4, "seq_len": 4096}) is None
    # only feasible completions: tile 128 at stages >= 2 exceeds the fake's shared memory
    assert [c.config for c in SearchSpace(kernel).completions(
        Candidate("fake", {"tile": 128, "warps": 4}))] == [{"tile": 128, "warps": 4, "stages": 1}]
    assert db.predecessor(GPU, identity, entry["shape"])["best"]["config"] == \
        {"tile": 64, "warps": 4}
    opts = options(tmp_path, trials=2 + 3)  # two defaults + the old winner at stages 1..3
    results = tune_plan(FakePlan(kernel), opts)
    assert [r.status for r in results] == ["tuned", "tuned"]
    study = load_study(tmp_path, kernel, kernel.shapes[0])
    seeded = [SearchSpace.from_params(t.params) for t in study.get_trials()
              if t.user_attrs.get("prior")]
    assert sorted(c.config["stages"] for c in seeded) == [1, 2, 3]
    assert all(c.config["tile"] == 64 and c.config["warps"] == 4 for c in seeded)
    assert all(t.user_attrs["outcome"] == "measured" for t in study.get_trials()
               if t.user_attrs.get("prior"))

    assert "seeded with the winner of this kernel's previous version" in opts.stream.getvalue()
    other = load_study(tmp_path, kernel, kernel.shapes[1])
    assert not [t for t in other.get_trials() if t.user_attrs.get("prior")]
    assert stray.read_text() == "{not json"  # passed over, left as it was
    # a previous winner the space cannot hold any more (a key since removed) is skipped
    gone = {**entry, "shape": {"batch": 4, "seq_len": 4096},
            "best": {**entry["best"], "config": {"tile": 64, "warps": 4, "unrolled": 1}}}
    db.record(GPU, old_identity, gone)
    db.path_for(GPU, identity).unlink()
    opts = options(tmp_path, trials=3)
    opts.cache_dir = tmp_path / "cache2"
    tune_plan(FakePlan(kernel), opts)
    assert "previous version" in opts.stream.getvalue() and \
        "not in today's space" in opts.stream.getvalue()


def test_every_enqueued_candidate_is_measured_past_a_small_budget(tmp_path, fake_log):
    """Defaults, the previous version's winner and the adapter's seeds are measured even when
    they outnumber --trials, the winner before the seeds: an H100 re-tune at --trials 4 had
    three seeds and a default fill the budget, dropped the old winner and recorded a slower
    config (bench/NOTES.md, Session 21)."""
    from sparsegen.plan import rule_kernel_plans

    kernel = fake_kernel(shapes=((1, 1024),))
    plan = FakePlan(kernel, rule_kernels=(("fake_seeded", tune_fakes.FakeRuleSeeded,
                                           FakeRuleStatic(64)),))
    (rule,) = rule_kernel_plans(plan)
    identity = kernel_identity(rule)
    old = {**identity, "templates": {"triton": {"path": "x.j2", "hash": "0ld"}}}
    winner = {"block": 64, "num_warps": 4}
    TuningDB(tmp_path / "db").record(GPU, old, {
        "shape": {"batch": 1, "seq_len": 1024}, "selected_blocks": 1,
        "versions": library_versions(), "trials": {"measured": 8, "failed": 0, "infeasible": 0},
        "best": {"backend": "triton", "config": winner, "median_ms": 1.0, "plain_ms": None,
                 "graph_ms": None, "bandwidth_gbs": None},
        "default": {"backend": "triton", "config": {"block": 32, "num_warps": 2},
                    "median_ms": 2.0},
        "study": "old", "tuned_at": "2026-01-01T00:00:00Z"})
    opts = options(tmp_path, trials=1, workers=2, kernels=("fake_seeded",))
    assert [r.status for r in tune_plan(plan, opts)] == ["tuned"]
    trials = load_study(tmp_path, rule, kernel.shapes[0]).get_trials()
    measured = [(t.params["triton.block"], t.params["triton.num_warps"]) for t in trials
                if t.user_attrs.get("outcome") == "measured"]
    assert measured[:4] == [(32, 2), (64, 4), (128, 1), (16, 4)]  # default, winner, seeds
    assert len(measured) == 4 and "4 evaluated" in opts.stream.getvalue().replace("/", " ")


def test_predecessor_matches_statics_holding_tuples(tmp_path):
    """A static with a tuple (the gate's pooling) is stored as a JSON list: its previous
    version's file must still match it (it did not, so gate_step re-tunes were unseeded)."""
    identity = kernel_identity(fake_kernel(shapes=((2, 2048),)))
    identity["static"] = {**identity["static"], "pooling": ("max", "min", "mean")}
    old = {**identity, "templates": {"fake": {"path": "x.j2", "hash": "0ld"}}}
    entry = {"shape": {"batch": 2, "seq_len": 2048}, "selected_blocks": 1,
             "versions": library_versions(),
             "trials": {"measured": 1, "failed": 0, "infeasible": 0},
             "best": {"backend": "fake", "config": {"tile": 64, "warps": 4, "stages": 1},
                      "median_ms": 1.0, "plain_ms": None, "graph_ms": None,
                      "bandwidth_gbs": None},
             "default": {"backend": "fake", "config": {"tile": 32, "warps": 2, "stages": 1},
                         "median_ms": 2.0},
             "study": "old", "tuned_at": "2026-01-01T00:00:00Z"}
    db = TuningDB(tmp_path / "db")
    db.record(GPU, old, entry)
    found = db.predecessor(GPU, identity, entry["shape"])
    assert found is not None and found["best"]["config"]["tile"] == 64
    other = {**identity, "static": {**identity["static"], "pooling": ("max",)}}
    assert db.predecessor(GPU, other, entry["shape"]) is None


def test_time_limit_stops_a_study_early_and_defers_the_rest(tmp_path, fake_log, monkeypatch):
    """A study under way when the run's time passes records its best so far (never worse
    than the default, which is measured first) and says so; studies not started are
    deferred, and a second run does them and searches the cut study on with --retune."""
    monkeypatch.setenv("FAKE_SLEEP", "0.15")
    kernel = fake_kernel(shapes=((1, 1024), (4, 4096), (8, 8192)))
    plan = FakePlan(kernel)
    t0 = time.monotonic()
    first = tune_plan(plan, options(tmp_path, trials=40, time_limit_s=2.0))
    assert time.monotonic() - t0 < 2.0 + 5.0 + 5.0  # + worker start and in-flight trials
    assert [r.status for r in first] == ["tuned", "deferred", "deferred"]
    cut = first[0]
    assert "stopped by the time limit after" in cut.message and "of 40" in cut.message
    assert cut.entry["trials"]["measured"] < 40
    assert cut.entry["best"]["median_ms"] <= cut.entry["default"]["median_ms"]
    assert "not started" in first[1].message
    monkeypatch.setenv("FAKE_SLEEP", "0")
    second = tune_plan(plan, options(tmp_path, trials=6))
    assert [r.status for r in second] == ["warm", "tuned", "tuned"]


def test_an_interrupted_tune_resumes_where_it_stopped(tmp_path, fake_log):
    cmd = [sys.executable, "-m", "tests.tune_fakes", "--db", str(tmp_path / "db"),
           "--cache", str(tmp_path / "cache"), "--trials", "6", "--workers", "1",
           "--result", str(tmp_path / "result.json")]
    env = {**os.environ, "FAKE_KILL_PARENT_AFTER": "4"}
    killed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert len(evaluations(fake_log)) == 4
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [r["status"] for r in json.loads((tmp_path / "result.json").read_text())] == \
        ["tuned", "tuned"]
    evals = evaluations(fake_log)
    # 3 evaluations finished before the kill and were kept; the 4th was cut off and re-run
    # (each study may overshoot its budget by one where the two workers race for the last
    # slot: the tuner's documented overshoot)
    assert 4 + (6 - 3) + 6 <= len(evals) <= 4 + (6 - 3) + 6 + 2
    assert len({(e["study"], e["trial"]) for e in evals}) == len(evals)  # none run twice
    kernel = fake_kernel()
    study = load_study(tmp_path, kernel, kernel.shapes[0])
    trials = study.get_trials()
    assert not [t for t in trials if not t.state.is_finished()]
    (lost,) = [t for t in trials if t.user_attrs.get("outcome") == "interrupted"]
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == lost.number]
    assert retry.params == lost.params and retry.user_attrs["outcome"] == "measured"
    assert sum(t.user_attrs.get("outcome") in ("measured", "failed") for t in trials) in (6, 7)


def test_child_worker_survives_crash_and_hang(tmp_path):
    w = ChildWorker("t", tmp_path)
    try:
        ok = w.call("os:getpgid", 0, 30)  # the child leads its own process group
        assert ok.ok and ok.value != os.getpgid(0)
        crash = w.call("os:_exit", 7, 30)
        assert not crash.ok and crash.kind == "crash" and "exited with code 7" in crash.reason
        hang = w.call("time:sleep", 60, 1.0)
        assert not hang.ok and hang.kind == "timeout"
        err = w.call("math:sqrt", -1, 30)
        assert not err.ok and err.kind == "error" and "math domain error" in err.reason
        again = w.call("os:getpgid", 0, 30)
        assert again.ok and again.value != ok.value and w.starts == 3
    finally:
        w.close()


def test_storage_errors_are_one_line_without_secrets(tmp_path):
    with pytest.raises(SparsegenError, match="give an RDB URL"):
        open_storage("redis://localhost/0")
    with pytest.raises(SparsegenError) as e:
        open_storage("postgresql://user:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(e.value) and "cannot open the study storage" in str(e.value)
    assert open_storage(f"journal:{tmp_path / 'j.log'}") is not None


# ---------------------------------------------------------------------------------------
# The CLI, with a real spec (Triton only, so the test needs just that adapter)
# ---------------------------------------------------------------------------------------
SPEC = """
name: cli_case
model: {num_q_heads: 8, num_kv_heads: 2, head_dim: 64, dtype: bf16}
selection: {rule: topk, block_size: 64, budget_tokens: 512}
backends: [triton]
tuning: {batch: [1, 4], seq_len: [1024, 4096]}
"""


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sparsegen.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_tune_without_gpu_needs_a_warm_database(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: `tune` would really tune")
    from sparsegen.plan import make_plan
    from sparsegen.spec import parse_spec

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC)
    db_dir = tmp_path / "db"
    env = {**os.environ, "SPARSEGEN_CACHE_DIR": str(tmp_path / "cache")}
    cold = _cli("tune", str(spec_path), "--gpu-name", "Fake GPU@9.0", "--db", str(db_dir),
                env=env)
    assert cold.returncode == 2 and "needs a CUDA GPU" in cold.stderr, cold.stderr
    assert "Traceback" not in cold.stderr

    from sparsegen.plan import rule_kernel_plans

    plan = make_plan(parse_spec(SPEC))
    kernel = plan.kernels[0]
    # the rule's kernels (metadata update, scoring, selection) are tuned per shape like the
    # attention kernel
    rules = [k for k in rule_kernel_plans(plan) if k.tunable]
    assert [k.name for k in rules] == ["quest_meta", "quest_score", "block_select"]
    versions = library_versions()
    db = TuningDB(db_dir)
    for k, shape in [(k, s) for k in [kernel, *rules] for s in k.shapes]:
        identity, default = kernel_identity(k), SearchSpace(k).defaults()[0]
        db.record(GPU, identity, {
            "shape": {"batch": shape.batch, "seq_len": shape.seq_len},
            "selected_blocks": k.selected_blocks(shape.seq_len), "versions": versions,
            "best": {"backend": "triton", "config": default.config, "median_ms": 0.01,
                     "plain_ms": 0.02, "graph_ms": 0.01, "bandwidth_gbs": 1000.0},
            "default": {"backend": "triton", "config": default.config, "median_ms": 0.01},
            "trials": {"measured": 1, "failed": 0, "infeasible": 0}, "study": "manual",
            "tuned_at": "2026-01-01T00:00:00Z"})
    t0 = time.monotonic()
    warm = _cli("tune", str(spec_path), "--gpu-name", "Fake GPU@9.0", "--db", str(db_dir),
                "--time-limit", "30", "-o", str(tmp_path / "out"), env=env)
    assert time.monotonic() - t0 < 5 + 2  # + interpreter start-up of this subprocess
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.count("warm") == 16 and "skipped" not in warm.stdout
    configs = json.loads((tmp_path / "out" / "cli_case" / "tuned_configs.json").read_text())
    assert len(configs["kernels"]["sparse_decode"]["tuned"]["fake-gpu-sm90"]["buckets"]) == 4
    # --retune measures the recorded winners again: one line saying so, the database as it was
    before = {p: p.read_bytes() for p in db_dir.rglob("*.json")}
    again = _cli("tune", str(spec_path), "--gpu-name", "Fake GPU@9.0", "--db", str(db_dir),
                 "--retune", "--kernels", "block_select", env=env)
    assert again.returncode == 2 and "--retune measures block_select" in again.stderr, \
        again.stderr
    assert "needs a CUDA GPU" in again.stderr and "Traceback" not in again.stderr
    assert {p: p.read_bytes() for p in db_dir.rglob("*.json")} == before


def test_cli_tune_kernel_filter_typo_is_one_line(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC)
    env = {**os.environ, "SPARSEGEN_CACHE_DIR": str(tmp_path / "cache")}
    r = _cli("tune", str(spec_path), "--gpu-name", "Fake GPU@9.0", "--db", str(tmp_path / "db"),
             "--kernels", "block_selct", env=env)
    assert r.returncode == 2, r.stderr
    assert "--kernels block_selct: not in this spec's plan; its kernels are " in r.stderr
    assert "block_select" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "db").exists()   # nothing written
