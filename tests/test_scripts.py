"""scripts/tune-examples.sh on a machine without a GPU: each spec's tune fails fast with a named
error, the loop goes on, and SAVE_DB packs tuning_db/ into one file after each spec (how a lent
device's tuned files come back whole); a malformed budget is refused."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tune-examples.sh"


def _run(tmp_path, *args, **env):
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PATH": path, "CUDA_VISIBLE_DEVICES": "",
                               "SPARSEGEN_GPU": "", **env})


def test_save_db_packs_the_whole_database(tmp_path):
    saved = tmp_path / "out" / "db.tgz"
    saved.parent.mkdir()
    proc = _run(tmp_path, "60", str(tmp_path / "logs"), "--kernels", "quest_meta",
                SPECS="quest-topk nsa-topk", SAVE_DB=str(saved))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("rc ") == 2 and "no CUDA GPU" in proc.stdout
    with tarfile.open(saved) as tar:
        packed = {n for n in tar.getnames() if n.endswith(".json")}
    committed = {str(p.relative_to(ROOT)) for p in (ROOT / "tuning_db").rglob("*.json")}
    assert packed == committed and committed
    assert not saved.with_name("db.tgz.tmp").exists()


def test_a_malformed_budget_is_refused(tmp_path):
    proc = _run(tmp_path, "ten", str(tmp_path / "logs"))
    assert proc.returncode == 2 and "SECONDS must be a whole number" in proc.stderr
