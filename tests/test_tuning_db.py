"""The tuning database: clean files, atomic merged writes, corrupt/hand-edited files refused."""
from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys

import pytest

from tests import tune_fakes
from sparsegen.errors import SparsegenError
from sparsegen.tune.db import (DbError, GpuId, TuningDB, backend_label, detect_gpu,
                               identity_key, kernel_identity, library_versions, nearest_bucket)

GPU = GpuId("NVIDIA H100 80GB HBM3", "9.0")
VERSIONS = {"tilelang": "0.1.15", "torch": "2.11.0", "triton": "3.6.0"}


def make_entry(batch=1, seq_len=8192, ms=0.05, versions=VERSIONS):
    return {
        "shape": {"batch": batch, "seq_len": seq_len}, "selected_blocks": 64,
        "versions": dict(versions),
        "best": {"backend": "fake", "config": {"tile": 64, "warps": 4, "stages": 1},
                 "median_ms": ms, "plain_ms": ms * 2, "graph_ms": ms, "bandwidth_gbs": 2500.0},
        "default": {"backend": "fake", "config": {"tile": 32, "warps": 2, "stages": 2},
                    "median_ms": ms * 1.5},
        "trials": {"measured": 40, "failed": 2, "infeasible": 5},
        "study": "s", "tuned_at": "2026-01-01T00:00:00Z",
    }


@pytest.fixture
def identity():
    return kernel_identity(tune_fakes.fake_kernel())


def test_record_lookup_and_clean_file(tmp_path, identity):
    db = TuningDB(tmp_path)
    path = db.record(GPU, identity, make_entry(8, 32768))
    db.record(GPU, identity, make_entry(1, 8192))
    assert path == tmp_path / "nvidia-h100-80gb-hbm3-sm90" / \
        f"fake_decode-{identity_key(identity)}.json"
    text = path.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, indent=2) + "\n"  # diffs cleanly
    assert [e["shape"]["batch"] for e in data["entries"]] == [1, 8]  # stable order
    got = db.lookup(GPU, identity, {"batch": 8, "seq_len": 32768}, VERSIONS)
    assert got["best"]["median_ms"] == 0.05
    assert db.lookup(GPU, identity, {"batch": 8, "seq_len": 32768},
                     {**VERSIONS, "torch": "2.12.0"}) is None
    assert db.lookup(GPU, identity, {"batch": 16, "seq_len": 32768}, VERSIONS) is None
    assert db.lookup(GpuId("NVIDIA H200", "9.0"), identity,
                     {"batch": 8, "seq_len": 32768}, VERSIONS) is None
    # replacing an entry keeps the others
    db.record(GPU, identity, make_entry(8, 32768, ms=0.04))
    entries = db.load(path)["entries"]
    assert len(entries) == 2 and entries[1]["best"]["median_ms"] == 0.04


def test_changed_template_changes_the_key(monkeypatch, identity):
    import sparsegen.codegen.render as render

    original = render.template_source
    monkeypatch.setattr(render, "template_source", lambda name: original(name) + "# edit\n")
    changed = kernel_identity(tune_fakes.fake_kernel())
    assert identity_key(changed) != identity_key(identity)


def test_a_called_kernels_template_is_part_of_the_identity(monkeypatch):
    """block_select renders and launches the TileLang select (algo=tilelang): an edit of that
    template changes block_select's key and makes its recorded winners stale; kernels that
    call nothing keep the identity they always had (no depends_on)."""
    import sparsegen.codegen.render as render
    from sparsegen.plan import make_plan, rule_kernel_plans
    from sparsegen.spec import load_spec
    from sparsegen.tune.db import templates_current

    from pathlib import Path
    spec = load_spec(Path(__file__).resolve().parents[1] / "examples/specs/seer-attention-r.yaml")
    plans = {k.name: k for k in rule_kernel_plans(make_plan(spec))}
    before = kernel_identity(plans["block_select"])
    deps = before["templates"]["triton"]["depends_on"]
    assert [d["path"] for d in deps] == ["tilelang/block_select.py.j2"]
    assert "depends_on" not in kernel_identity(plans["gate_step"])["templates"]["triton"]
    assert templates_current(before["templates"])
    original = render.template_source
    monkeypatch.setattr(render, "template_source", lambda name: original(name) + (
        "# edit\n" if name == "tilelang/block_select.py.j2" else ""))
    assert identity_key(kernel_identity(plans["block_select"])) != identity_key(before)
    assert not templates_current(before["templates"])


def test_versions_are_read_without_importing():
    v = library_versions()
    assert set(v) == {"tilelang", "triton", "torch"} and all(v.values())


def _writer(root, identity, k):
    db = TuningDB(root)
    for i in range(6):
        db.record(GPU, identity, make_entry(batch=k + 1, seq_len=1024 * (i + 1)))


def test_concurrent_writers_lose_nothing(tmp_path, identity):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(tmp_path, identity, k)) for k in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    db = TuningDB(tmp_path)
    (path,) = db.files()
    assert len(db.load(path)["entries"]) == 36
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage", [
    lambda t: t[: len(t) // 2],                                   # truncated
    lambda t: "not json at all",
    lambda t: t.replace('"median_ms": 0.05', '"median_ms": 0.01', 1),   # hand-edited value
    lambda t: t.replace('"tile": 64', '"tile": 128', 1),                 # hand-edited config
    lambda t: t.replace('"study": "s"', '"study": "s", "note": "mine"', 1),  # unknown field
    lambda t: t.replace('"name": "fake_decode"', '"name": "other"', 1),      # header edit
])
def test_corrupt_or_hand_edited_file_is_refused_and_kept(tmp_path, identity, damage):
    db = TuningDB(tmp_path)
    path = db.record(GPU, identity, make_entry())
    bad = damage(path.read_text())
    path.write_text(bad)
    with pytest.raises(DbError) as e:
        db.lookup(GPU, identity, {"batch": 1, "seq_len": 8192}, VERSIONS)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DbError):
        db.record(GPU, identity, make_entry(batch=2))
    with pytest.raises(DbError):
        db.prune(lambda data, entry: False)
    assert path.read_text() == bad  # never overwritten


def test_backend_label_names_the_algorithm_a_config_picks():
    """A TileLang form recorded under its adapter's backend reads as such in `db list`, the
    tune summary and `sparsegen compile`."""
    assert backend_label("triton", {"algo": "tilelang", "num_warps": 8}) == "triton (tilelang)"
    assert backend_label("triton", {"algo": "radix8"}) == "triton (radix8)"
    assert backend_label("triton", {"algo": "triton"}) == "triton"
    assert (backend_label("triton", {"algo": "tilelang", "cluster": 2})
            == "triton (tilelang, cluster 2)")
    assert backend_label("triton", {"algo": "tilelang", "cluster": 1}) == "triton (tilelang)"
    assert backend_label("tilelang", {"block_n": 64}) == "tilelang"


def test_nearest_bucket():
    buckets = [{"batch": b, "seq_len": s} for b in (1, 8, 16) for s in (8192, 32768, 131072)]
    assert nearest_bucket(buckets, 8, 32768) == {"batch": 8, "seq_len": 32768}
    assert nearest_bucket(buckets, 6, 40000) == {"batch": 8, "seq_len": 32768}
    assert nearest_bucket(buckets, 1, 1000) == {"batch": 1, "seq_len": 8192}
    assert nearest_bucket(buckets, 64, 10 ** 6) == {"batch": 16, "seq_len": 131072}
    assert nearest_bucket([], 1, 1) is None


def test_gpu_identity(monkeypatch):
    assert GPU.slug == "nvidia-h100-80gb-hbm3-sm90"
    assert GpuId.parse("NVIDIA H100 80GB HBM3@9.0") == GPU
    monkeypatch.setenv("SPARSEGEN_GPU", "Fake GPU@8.9")
    assert detect_gpu() == GpuId("Fake GPU", "8.9")
    assert detect_gpu("Other@9.0").name == "Other"
    for bad in ("H100", "H100@", "@9.0", "H100@sm90"):
        with pytest.raises(SparsegenError, match="NAME@MAJOR.MINOR"):
            GpuId.parse(bad)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sparsegen.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_db_commands(tmp_path, identity):
    db = TuningDB(tmp_path)
    db.record(GPU, identity, make_entry(1, 8192))
    db.record(GPU, identity, make_entry(8, 32768, versions={**VERSIONS, "torch": "0.0.1"}))
    db.record(GpuId("NVIDIA H200", "9.0"), identity, make_entry(16, 131072))
    r = _cli("db", "list", "--db", str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4 and "b8_s32768" in r.stdout and "nvidia-h200-sm90" in r.stdout
    assert "1.50x" in r.stdout

    r = _cli("db", "show", "--db", str(tmp_path), "--shape", "b16_s131072")
    assert r.returncode == 0, r.stderr
    (shown,) = json.loads(r.stdout)
    assert shown["gpu"]["name"] == "NVIDIA H200" and shown["best"]["median_ms"] == 0.05

    r = _cli("db", "prune", "--db", str(tmp_path))
    assert r.returncode == 2 and "needs a filter" in r.stderr

    r = _cli("db", "prune", "--db", str(tmp_path), "--other-versions", "--dry-run")
    assert r.returncode == 0 and "would remove 3 entries" in r.stdout  # none match installed

    r = _cli("db", "prune", "--db", str(tmp_path), "--gpu", "nvidia-h200-sm90")
    assert r.returncode == 0 and "removed 1 entry" in r.stdout, r.stdout + r.stderr
    assert len(db.files()) == 1  # the emptied file is gone
    r = _cli("db", "prune", "--db", str(tmp_path), "--shape", "b8_s32768")
    assert "removed 1 entry" in r.stdout
    assert [e["shape"]["batch"] for e in db.load(db.files()[0])["entries"]] == [1]

    # an entry tuned with another version of the adapter's code is stale
    old = json.loads(json.dumps(identity))
    old["templates"]["fake"]["adapter_hash"] = "0" * 16
    db.record(GPU, old, make_entry(4, 4096))
    assert len(db.files()) == 2
    r = _cli("db", "prune", "--db", str(tmp_path), "--stale")
    assert r.returncode == 0 and "removed 1 entry" in r.stdout, r.stdout + r.stderr
    assert len(db.files()) == 1 and db.lookup(GPU, identity, {"batch": 1, "seq_len": 8192},
                                              VERSIONS)

    db.files()[0].write_text("{")
    r = _cli("db", "list", "--db", str(tmp_path))
    assert r.returncode == 2 and "is not valid JSON" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_merge_adds_what_is_missing_and_settles_conflicts_by_policy(tmp_path, identity):
    H200 = GpuId("NVIDIA H200", "9.0")

    def fresh(name):
        here, there = TuningDB(tmp_path / name / "here"), TuningDB(tmp_path / name / "there")
        here.record(GPU, identity, make_entry(1, 8192, ms=0.05))
        here.record(GPU, identity, make_entry(8, 32768, ms=0.05))
        there.record(GPU, identity, make_entry(1, 8192, ms=0.04))    # faster there
        there.record(GPU, identity, make_entry(8, 32768, ms=0.06))   # slower there
        there.record(GPU, identity, make_entry(16, 131072, ms=0.07))  # only there
        there.record(H200, identity, make_entry(1, 8192, ms=0.03))   # another GPU
        return here, there

    def ms(db, gpu, b, s):
        return db.lookup(gpu, identity, {"batch": b, "seq_len": s}, VERSIONS)["best"]["median_ms"]

    here, there = fresh("faster")
    before = {p: p.read_bytes() for p in there.files()}
    done = here.merge(there)
    assert sorted(a for a, _, _ in done) == ["added", "added", "kept", "replaced"]
    assert (ms(here, GPU, 1, 8192), ms(here, GPU, 8, 32768), ms(here, GPU, 16, 131072),
            ms(here, H200, 1, 8192)) == (0.04, 0.05, 0.07, 0.03)
    assert {p: p.read_bytes() for p in there.files()} == before  # the source is only read
    assert here.merge(there) and all(a == "kept" for a, _, _ in here.merge(there))

    here, there = fresh("other")
    here.merge(there, prefer="other")
    assert (ms(here, GPU, 1, 8192), ms(here, GPU, 8, 32768)) == (0.04, 0.06)
    here, there = fresh("this")
    here.merge(there, prefer="this")
    assert (ms(here, GPU, 1, 8192), ms(here, GPU, 8, 32768)) == (0.05, 0.05)

    # newer: a re-tune comes back inside a copy of the whole database; only its later entry
    # wins, whatever the two runs' timings, and the copy's older entries never replace
    here, there = fresh("newer")
    there.record(GPU, identity, {**make_entry(8, 32768, ms=0.06), "tuned_at": "2026-02-01T00:00:00Z"})
    here.record(GPU, identity, {**make_entry(1, 8192, ms=0.05), "tuned_at": "2026-03-01T00:00:00Z"})
    done = here.merge(there, prefer="newer")
    assert (ms(here, GPU, 1, 8192), ms(here, GPU, 8, 32768)) == (0.05, 0.06)
    assert sorted(a for a, _, _ in done) == ["added", "added", "kept", "replaced"]

    here, there = fresh("dry")
    before = {p: p.read_bytes() for p in here.files()}
    assert len(here.merge(there, dry_run=True)) == 4
    assert {p: p.read_bytes() for p in here.files()} == before
    with pytest.raises(DbError, match="is the database being merged into"):
        here.merge(TuningDB(here.root))


def test_merge_with_a_corrupt_side_writes_nothing(tmp_path, identity):
    here, there = TuningDB(tmp_path / "here"), TuningDB(tmp_path / "there")
    mine = here.record(GPU, identity, make_entry(1, 8192))
    theirs = there.record(GPU, identity, make_entry(8, 32768))
    there.record(GpuId("NVIDIA H200", "9.0"), identity, make_entry(1, 8192))
    good = mine.read_bytes()
    theirs.write_text(theirs.read_text().replace('"study": "s"', '"study": "x"', 1))
    with pytest.raises(DbError, match="fails its checksum"):
        here.merge(there)
    assert mine.read_bytes() == good and len(here.files()) == 1
    r = _cli("db", "merge", str(there.root), "--db", str(here.root))
    assert r.returncode == 2 and "fails its checksum" in r.stderr and "Traceback" not in r.stderr
    r = _cli("db", "merge", str(tmp_path / "nowhere"), "--db", str(here.root))
    assert r.returncode == 2 and "no such database directory" in r.stderr
    theirs.unlink()
    r = _cli("db", "merge", str(there.root), "--db", str(here.root), "--prefer", "source")
    assert r.returncode == 0 and "added 1, replaced 0, kept 0 (--prefer source)" in r.stdout, \
        r.stdout + r.stderr
    assert len(here.files()) == 2


def test_committed_winners_match_todays_kernels():
    """Every entry in the repository's tuning_db/ was tuned with today's templates and
    adapter modules: an edit of a tuned kernel's template or adapter module (which makes
    its winners stale and unused) must come with a re-tune or a `db prune --stale`."""
    from pathlib import Path

    from sparsegen.tune.db import templates_current

    root = Path(__file__).resolve().parents[1] / "tuning_db"
    stale = [path.name for path, data in TuningDB(root).load_all()
             if not templates_current(data["kernel"]["templates"])]
    assert not stale, f"stale tuning_db files (re-tune or prune them): {stale}"


def test_a_file_given_as_the_database_is_refused(tmp_path, monkeypatch):
    """--db (or $SPARSEGEN_TUNING_DB) naming a file, e.g. one entry's JSON, is an error, not
    an empty database that builds an untuned module without a word; the file is untouched."""
    f = tmp_path / "entry.json"
    f.write_text("{}")
    with pytest.raises(DbError, match="is a file, not a tuning database"):
        TuningDB(f)
    monkeypatch.setenv("SPARSEGEN_TUNING_DB", str(f))
    with pytest.raises(DbError, match="is a file"):
        TuningDB()
    assert f.read_text() == "{}"
    assert TuningDB(tmp_path / "not-yet").files() == []  # a database still to be made is fine
