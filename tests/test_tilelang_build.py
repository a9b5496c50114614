"""The TileLang build helper (sparsegen/codegen/tilelang_build.py) on the CPU: its in-process
compile cache with tilelang.compile and the device's arch replaced by fakes (the caching and
error path; tests/test_select_tilelang_gpu.py builds for real), and prewarm with one real
sm_90a build into a scratch TileLang disk cache."""
import threading
import time
import types
from pathlib import Path

import pytest

from sparsegen.codegen import tilelang_build
from sparsegen.codegen.backend import CompileError


@pytest.fixture
def fake_build(monkeypatch):
    tilelang = pytest.importorskip("tilelang")
    calls = []

    def compile(func, target, execution_backend, pass_configs):
        calls.append((func, target["arch"], execution_backend))
        time.sleep(0.05)  # a build takes a while: racing threads would each start one
        if func == "broken":
            raise RuntimeError("nvcc failed: no such register")
        return object()

    monkeypatch.setattr(tilelang, "compile", compile)
    monkeypatch.setattr(tilelang_build, "device_arch", lambda device: f"sm_{device}a")
    monkeypatch.setattr(tilelang_build, "_KERNELS", {})
    return calls


def module(name):
    return lambda: types.SimpleNamespace(build=lambda: name, PASS_CONFIGS={})


def test_one_build_per_key_and_arch_even_when_threads_race(fake_build):
    got = []
    barrier = threading.Barrier(8)

    def first_call():
        barrier.wait()
        got.append(tilelang_build.compiled_for(("k", 1), 90, module("f"), "test kernel"))

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_build) == 1 and all(k is got[0] for k in got)
    # another key, another device arch: each its own build
    other = tilelang_build.compiled_for(("k", 2), 90, module("g"), "test kernel")
    elsewhere = tilelang_build.compiled_for(("k", 1), 100, module("f"), "test kernel")
    assert len({id(got[0]), id(other), id(elsewhere)}) == 3
    assert [c[1] for c in fake_build] == ["sm_90a", "sm_90a", "sm_100a"]


def test_a_failed_build_names_the_kernel_and_is_not_cached(fake_build):
    for _ in range(2):
        with pytest.raises(CompileError, match=r"test kernel: RuntimeError: nvcc failed"):
            tilelang_build.compiled_for(("bad",), 90, module("broken"), "test kernel")
    assert len(fake_build) == 2


PREWARM_SCRIPT = r'''
import json, sys
from pathlib import Path
from sparsegen.codegen import tilelang_build as tb
from sparsegen.codegen.render import render_and_import

cache, build = Path(sys.argv[1]), sys.argv[2]
T = "tilelang/block_select.py.j2"
good = (T, {"block_size": 64, "threads": 256, "nmax": 512, "emit": "indices", "rows": 1}, build)
bad = (T, {**good[1], "rows": "no_such_name"}, build)
failed = tb.prewarm([good, good, bad], "sm_90a", workers=2)
kernels = sorted(cache.rglob("executable.so"))
stamps = [p.stat().st_mtime_ns for p in kernels]
tb.compile_for_arch(render_and_import(*good), "sm_90a")   # as compiled_for would
after = sorted(cache.rglob("executable.so"))
print(json.dumps({"failed": failed, "kernels": len(kernels), "after": len(after),
                  "rewritten": [p.stat().st_mtime_ns for p in after] != stamps}))
'''


def test_prewarm_fills_tilelang_disk_cache_for_the_in_process_compile(tmp_path):
    """A real build on the CPU: prewarm compiles a kernel once in a child process (a job
    given twice builds once; a failing job comes back as a line naming its error) into
    TileLang's disk cache, and the same compile in this process then loads that entry
    instead of building and writing its own."""
    pytest.importorskip("tilelang")
    import json
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    root = str(Path(tilelang_build.__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", PREWARM_SCRIPT, str(cache), str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TILELANG_CACHE_DIR": str(cache),
                               "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got["failed"]) == 1 and "NameError" in got["failed"][0], got
    assert got["kernels"] == got["after"] == 1 and not got["rewritten"], got
