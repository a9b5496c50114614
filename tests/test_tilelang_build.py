"""The TileLang build helper's compile cache (sparsegen/codegen/tilelang_build.py), on the CPU:
tilelang.compile and the device's arch are replaced by fakes, so what is checked is the
caching and error path, not a real build (tests/test_select_tilelang_gpu.py builds for real)."""
import threading
import time
import types

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
