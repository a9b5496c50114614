"""The scripts on a machine without a GPU. scripts/tune-examples.sh: each spec's tune fails
fast with a named error, the loop goes on, and SAVE_DB packs tuning_db/ into one file after
each spec (how a lent device's tuned files come back whole); a malformed budget is refused.
Every script parses, the device-session ones ask for their OUTDIR, and each writes no more
files there than a device call brings back."""
import os
import re
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


def _outdir_files(text: str) -> set[str]:
    """The files a device script writes under its OUTDIR, read from its text: each
    `"$out/NAME"`, a bench's `--out "$out/STEM"` as its .md and .json, and the file
    bench/profile_methods.py writes into $OUT."""
    name = r'([A-Za-z0-9_.-]+)(?![*A-Za-z0-9_.-])'   # a glob like gpu-tests-*.txt writes nothing
    names = set(re.findall(r'"\$out/' + name, text)) | set(re.findall(r'"\$out"/' + name, text))
    stems = set(re.findall(r'--out "\$out/([A-Za-z0-9_.-]+)"', text))
    # a bench told OUT="$out" writes its own file there
    names |= {"profile-methods.txt" for _ in re.findall(r'OUT="\$out".*profile_methods\.py', text)}
    return (names - stems) | {s + ext for s in stems for ext in (".md", ".json")}


def test_device_scripts_write_what_one_call_brings_back():
    """The device tool brings back at most 8 files from a call's $OUT (session 17 lost a
    packed tuning_db to the ninth): a device script's OUTDIR, for each of its stages, names
    at most 8, with no folder of logs in it."""
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        if script.name in ("main-job.sh", "tune-examples.sh"):
            continue
        # a script whose stages are separate calls (`case` branches) is counted per branch
        text = script.read_text()
        assert _outdir_files(text), script.name   # the reading finds what the script writes
        for stage in re.split(r"\n  [a-z-]+\)\n", text):
            files = _outdir_files(stage)
            assert len(files) <= 8, (script.name, sorted(files))
            assert not any(name in ("logs", "tune-logs") for name in files), script.name
