"""`tune --storage postgresql://...`: two worker processes share one study on a real
PostgreSQL server, with a CPU objective. No trial is lost or run twice, and both workers
agree on the best.

tests/pg/start_postgres.sh installs (apt-get, as root) and starts a throwaway server. When
no server can be had, the test is skipped with the reason, except under CI=true, where
that is a failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from sparsegen.tune.db import GpuId, TuningDB, kernel_identity, library_versions
from sparsegen.tune.tuner import open_storage, study_name
from tests.tune_fakes import fake_kernel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "pg" / "start_postgres.sh"
TRIALS = 10
WORKERS, THREADS = 2, 2


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and no PostgreSQL server: {reason}")
    pytest.skip(f"no PostgreSQL server: {reason}")


@pytest.fixture(scope="module")
def pg_url():
    was_running = subprocess.run(["bash", str(SCRIPT), "status"]).returncode == 0
    try:
        r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        _unavailable(f"{SCRIPT.name}: {e}")
    if r.returncode != 0 or not r.stdout.strip():
        _unavailable(f"{SCRIPT.name} failed: {r.stderr.strip()[-500:]}")
    url = r.stdout.strip().splitlines()[-1]
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _unavailable("psycopg2 is not installed (pip install psycopg2-binary)")
    yield url
    if not was_running:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


def test_two_workers_share_one_study(tmp_path, pg_url):
    kernel_name = f"pg_{uuid.uuid4().hex[:8]}"  # a fresh study each run
    log = tmp_path / "evals.jsonl"
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_SLEEP": "0.15"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.tune_fakes", "--storage", pg_url, "--db",
         str(tmp_path / "db"), "--cache", str(tmp_path / f"cache{i}"), "--trials", str(TRIALS),
         "--workers", str(THREADS), "--kernel-name", kernel_name,
         "--result", str(tmp_path / f"result{i}.json")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(WORKERS)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]

    evals = [json.loads(ln) for ln in log.read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "evaluate"]
    results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(WORKERS)]
    kernel = fake_kernel(kernel_name)
    storage = open_storage(pg_url)
    db = TuningDB(tmp_path / "db")
    import optuna

    for shape in kernel.shapes:
        name = study_name(kernel_identity(kernel), shape, GpuId("Fake GPU", "9.0"),
                          library_versions())
        trials = optuna.load_study(study_name=name, storage=storage).get_trials()
        assert all(t.state.is_finished() for t in trials), "a trial was left running/waiting"
        counted = [t for t in trials if t.user_attrs.get("outcome") in ("measured", "failed")]
        # the budget is met; racing workers may overshoot by the trials they had in flight
        assert TRIALS <= len(counted) <= TRIALS + WORKERS * THREADS - 1
        ran = Counter(e["trial"] for e in evals if e["study"] == name)
        assert max(ran.values()) == 1, "a trial was evaluated twice"
        assert set(ran) == {t.number for t in counted}, "a trial was lost"
        owners = {t.user_attrs["owner"] for t in counted}
        assert len(owners) == WORKERS, f"not every worker did work: {owners}"
        keys = [json.dumps(t.params, sort_keys=True) for t in counted]
        assert len(set(keys)) == len(keys), "a candidate was evaluated twice"

        measured = [t for t in counted if t.user_attrs["outcome"] == "measured"]
        best = min(measured, key=lambda t: (t.value, t.number))
        agreed = [next(r for r in res if r["shape"] == shape.key) for res in results]
        assert all(a["status"] == "tuned" for a in agreed)
        assert agreed[0]["best"] == agreed[1]["best"]
        assert agreed[0]["best"]["median_ms"] == pytest.approx(best.value)
        recorded = db.lookup(GpuId("Fake GPU", "9.0"), kernel_identity(kernel),
                             {"batch": shape.batch, "seq_len": shape.seq_len},
                             library_versions())
        assert recorded["best"] == agreed[0]["best"]
