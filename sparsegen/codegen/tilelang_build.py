"""Building rendered TileLang kernels: the no-GPU lower + nvcc compile for sm_90a (CI's check
of every generated kernel), the device's arch string, and the per-process cache of kernels
compiled for a device (compiling takes seconds, so threads racing to the first call share
one build), and a parallel prewarm of TileLang's disk cache for callers that need many kernels.

Used by the TileLang selection (tilelang_select.py) and the entmax tau kernel
(tilelang_entmax.py); tilelang_decode.py still carries its own copy of these steps, to be
moved here at its next re-tune (its source is part of its tuned entries' key: see
bench/NOTES.md).
"""
from __future__ import annotations

import threading

from .backend import CompileError

SM90_TARGET = {"kind": "cuda", "arch": "sm_90a"}
TL_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}   # spec dtype -> TileLang's name

_ARCHS: dict = {}            # CUDA device index -> "sm_90a", ...
_KERNELS: dict = {}          # caller's key + arch + execution backend -> compiled kernel
_LOCK = threading.Lock()


def device_arch(device) -> str:
    """TileLang's arch for a CUDA device ("sm_90a" on Hopper: wgmma / TMA need the `a`),
    asked of the driver once per device."""
    import torch

    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    arch = _ARCHS.get(index)
    if arch is None:
        major, minor = torch.cuda.get_device_capability(index)
        arch = _ARCHS[index] = f"sm_{major}{minor}" + ("a" if major == 9 else "")
    return arch


def lower_sm90(mod, what: str) -> tuple[object, str, bytes]:
    """(TileLang's lowered artifact, CUDA source, cubin) of a rendered module (its build() and
    PASS_CONFIGS) for sm_90a, with no GPU; CompileError names `what` on failure."""
    import tilelang
    from tilelang import tvm
    from tilelang.cuda.backend import tilelang_callback_cuda_compile

    try:
        target = tvm.target.Target(SM90_TARGET)
        with tvm.transform.PassContext(opt_level=3, config=mod.PASS_CONFIGS), target:
            art = tilelang.lower(mod.build(), target=SM90_TARGET)
            cubin = tilelang_callback_cuda_compile(art.kernel_source, target, mod.PASS_CONFIGS)
    except Exception as e:  # TileLang / TVM / nvcc fail in many types
        raise CompileError(f"{what}: {type(e).__name__}: {str(e)[:500]}") from e
    return art, art.kernel_source, cubin


def compiled_for(key: tuple, device, load_module, what: str,
                 execution_backend: str = "tvm_ffi"):
    """The kernel of `key` compiled for `device`'s arch, built once per process:
    load_module() gives the rendered module. tvm_ffi passes tensors through DLPack on torch's
    current stream, so a CUDA graph captures the launch."""
    arch = device_arch(device)
    full = (*key, arch, execution_backend)
    kernel = _KERNELS.get(full)
    if kernel is None:
        with _LOCK:
            kernel = _KERNELS.get(full)
            if kernel is None:
                mod = load_module()
                try:
                    kernel = compile_for_arch(mod, arch, execution_backend)
                except Exception as e:
                    raise CompileError(f"{what}: {type(e).__name__}: {str(e)[:500]}") from e
                _KERNELS[full] = kernel
    return kernel


def compile_for_arch(mod, arch: str, execution_backend: str = "tvm_ffi"):
    """tilelang.compile of a rendered module for `arch` (no GPU needed): the one call that
    compiled_for and prewarm both make, so that a kernel prewarm built is the same entry of
    TileLang's disk cache (~/.tilelang/cache, $TILELANG_CACHE_DIR) that compiled_for asks."""
    import tilelang

    return tilelang.compile(mod.build(), target={"kind": "cuda", "arch": arch},
                            execution_backend=execution_backend, pass_configs=mod.PASS_CONFIGS)


def build_job(job, arch: str, execution_backend: str = "tvm_ffi"):
    """Render and compile one (template, params, build_dir) job for `arch` into TileLang's
    disk cache: a prewarm child's work, and the tuner's CPU worker's (tune/worker.py)."""
    from .render import render_and_import

    return compile_for_arch(render_and_import(*job), arch, execution_backend)


def prewarm(jobs, arch: str, workers: int | None = None,
            execution_backend: str = "tvm_ffi") -> list[str]:
    """Compile rendered kernels side by side in child processes into TileLang's disk cache,
    so that their first compiled_for in this process loads them (~0.1 s) instead of compiling
    them one at a time behind the lock (~10 s each): for a probe or a test run that uses a
    dozen kernels. jobs: (template, params, build_dir) as render_and_import takes them (params
    JSON-able). Returns a line for each job that failed (compiled_for raises the same error
    where the kernel is used)."""
    import json
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    unique = sorted({json.dumps([t, p, str(b) if b else None], sort_keys=True)
                     for t, p, b in jobs})
    if not unique:
        return []
    root = str(Path(__file__).resolve().parents[2])   # the folder that holds sparsegen/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}

    def build(job: str) -> str | None:
        proc = subprocess.run([sys.executable, "-m", __name__, arch, execution_backend, job],
                              capture_output=True, text=True, env=env)
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        return None if proc.returncode == 0 else f"{job[:300]}: {last[0][:300]}"

    with ThreadPoolExecutor(workers or min(len(unique), os.cpu_count() or 1)) as pool:
        return [r for r in pool.map(build, unique) if r]


if __name__ == "__main__":   # one prewarm job: python -m ... ARCH EXECUTION_BACKEND JOB_JSON
    import json
    import sys

    build_job(json.loads(sys.argv[3]), sys.argv[1], sys.argv[2])
