"""Building rendered TileLang kernels: the no-GPU lower + nvcc compile for sm_90a (CI's check
of every generated kernel), the device's arch string, and the per-process cache of kernels
compiled for a device (compiling takes seconds, so threads racing to the first call share
one build).

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
                import tilelang

                mod = load_module()
                try:
                    kernel = tilelang.compile(mod.build(),
                                              target={"kind": "cuda", "arch": arch},
                                              execution_backend=execution_backend,
                                              pass_configs=mod.PASS_CONFIGS)
                except Exception as e:
                    raise CompileError(f"{what}: {type(e).__name__}: {str(e)[:500]}") from e
                _KERNELS[full] = kernel
    return kernel
