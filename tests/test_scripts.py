"""The scripts on a machine without a GPU. scripts/tune-examples.sh: each spec's tune fails
fast with a named error, the loop goes on, and SAVE_DB packs tuning_db/ into one file after
each spec (how a lent device's tuned files come back whole); a malformed budget is refused.
Every script parses, and the device-session ones ask for their OUTDIR."""
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


def test_every_script_parses_and_device_scripts_need_their_outdir(tmp_path):
    """The device-session scripts run on a lent GPU, where a syntax slip costs a call: each
    script parses, and one that takes an OUTDIR stops with its usage when given none."""
    scripts = sorted((ROOT / "scripts").glob("*.sh"))
    assert scripts
    for script in scripts:
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, (script.name, check.stderr)
        if script.name in ("main-job.sh", "tune-examples.sh"):  # optional / numeric first arg
            continue
        proc = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode != 0 and "usage" in proc.stderr, (script.name, proc.stderr)
