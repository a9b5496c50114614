"""Shared plumbing of the selection-side Triton kernels (block selection, gate scoring, Quest
metadata and scoring, distillation target).

Each kernel family is one Jinja template plus one adapter class holding a (static params,
tile config) pair, with the tuner's classmethods `tunable_space`, `default_config` and
`check_config`, and `bench_inputs` / `reference` / `__call__` so a generic tuner can check a
candidate against the plain-torch reference and time it. This base renders the template,
imports it (patching Triton's interpreter for NumPy >= 2.4 when TRITON_INTERPRET=1) and
compiles every @jit function for sm_90 with no GPU.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from .backend import CompileError
from .render import import_file, render_to_file
from .triton_decode import _patch_interpreter_index
# the decode adapter's constants, re-exported for the rule kernels' adapters
from .triton_decode import _ELEM_BYTES as ELEM_BYTES  # noqa: F401
from .triton_decode import LOG2E, SMEM_LIMIT  # noqa: F401



def _resource_usage(cubin: bytes, name: str) -> dict:
    """Registers / stack / local memory from the decode adapter's cuobjdump helper, when it
    offers one ({} otherwise: the facts are informative, never required)."""
    try:
        from .triton_decode import _resource_usage as usage
    except ImportError:
        return {}
    return usage(cubin, name)


TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TRITON_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}

_SHARED: dict = {}  # (adapter class, static, config) -> instance, see TritonKernel.shared


def pow2(x: int) -> bool:
    return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def torch_dtype(name: str):
    import torch
    return getattr(torch, TORCH_DTYPES[name])


def dtype_name(dtype) -> str:
    import torch
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if dtype not in names:
        raise TypeError(f"dtype {dtype} is not one of bf16, fp16, fp32")
    return names[dtype]


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host ints (grid sizes)."""
    return -(-a // b)


def check_int_config(config: dict, keys: tuple) -> str | None:
    """Common shape check of a tile config: exactly `keys`, all ints."""
    missing = [k for k in keys if k not in config]
    if missing:
        return f"missing keys {missing}"
    unknown = sorted(set(config) - set(keys))
    if unknown:
        return f"unknown keys {unknown}"
    for k in keys:
        if not isinstance(config[k], int) or isinstance(config[k], bool):
            return f"{k}={config[k]!r} is not an int"
    if "num_warps" in config and config["num_warps"] not in (1, 2, 4, 8, 16):
        return f"num_warps={config['num_warps']} not in (1, 2, 4, 8, 16)"
    return None


def interpreted() -> bool:
    """Whether this process imported Triton in interpreter mode (TRITON_INTERPRET=1)."""
    import triton.language as tl
    return type(tl.cdiv).__name__ == "InterpretedFunction"


def _compile_in_child(kernel, keep_asm: bool) -> dict:
    import os
    import pickle
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp, "job.pkl"), Path(tmp, "result.pkl")
        job.write_bytes(pickle.dumps((type(kernel), kernel.static, kernel.config,
                                      kernel.build_dir, keep_asm)))
        code = ("import pickle, sys\n"
                "cls, st, cfg, bd, keep = pickle.load(open(sys.argv[1], 'rb'))\n"
                "try:\n"
                "    out = ('ok', cls(st, cfg, bd).compile_sm90(keep))\n"
                "except Exception as e:\n"
                "    out = ('error', str(e))\n"
                "pickle.dump(out, open(sys.argv[2], 'wb'))\n")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-c", code, str(job), str(result)], env=env,
                              capture_output=True, text=True, timeout=900)
        if not result.exists():
            raise CompileError(f"{kernel.name}: the compile process failed: "
                               f"{proc.stderr[-2000:]}")
        status, value = pickle.loads(result.read_bytes())
    if status != "ok":
        raise CompileError(value)
    return value


class TritonKernel:
    """One rendered Triton module (one or more @jit kernels) for one (static, config)."""

    name = ""
    template = ""  # under templates/, e.g. "triton/block_select.py.j2"

    def __init__(self, static, config: dict | None = None, build_dir: Path | None = None):
        self.static = static
        self.config = dict(self.default_config(static) if config is None else config)
        reason = self.check_config(static, self.config)
        if reason:
            raise ValueError(f"{self.name} config {self.config} is infeasible for {static}: "
                             f"{reason}")
        self.build_dir = build_dir
        self._path = None
        self._module = None

    @classmethod
    def shared(cls, static, config: dict | None = None):
        """The process-wide instance for (static, config), so a runtime path renders and
        imports its module once, not per call or per layer (config None: the default)."""
        key = (cls, static, None if config is None else tuple(sorted(config.items())))
        kern = _SHARED.get(key)
        if kern is None:
            kern = _SHARED[key] = cls(static, config)
        return kern

    # --- the tuner's view (CPU only) -----------------------------------------------------
    @classmethod
    def tunable_space(cls, static) -> dict[str, list]:
        raise NotImplementedError

    @classmethod
    def default_config(cls, static) -> dict:
        raise NotImplementedError

    @classmethod
    def check_config(cls, static, config: dict) -> str | None:
        raise NotImplementedError

    # --- code generation -----------------------------------------------------------------
    def template_params(self) -> dict:
        raise NotImplementedError

    def signatures(self) -> list[tuple[str, dict, tuple, dict]]:
        """(kernel name, {arg: triton type}, args assumed 16-divisible, launch options)."""
        raise NotImplementedError

    def render(self) -> Path:
        if self._path is None:
            self._path = render_to_file(self.template, self.template_params(), self.build_dir)
        return self._path

    @property
    def module(self):
        if self._module is None:
            mod = import_file(self.render())
            first = getattr(mod, self.signatures()[0][0])
            if type(first).__name__ == "InterpretedFunction":
                _patch_interpreter_index()
            self._module = mod
        return self._module

    def compile_sm90(self, keep_asm: bool = False) -> dict:
        """Compile every kernel for sm_90 with no GPU present; returns per-kernel facts
        (registers, spills, shared memory, sizes). Raises CompileError.

        Triton 3.6 decides at import whether its standard library (tl.max, tl.sum, ...) is
        interpreted and cannot compile in a process where it is: under TRITON_INTERPRET=1
        the compile runs in a child process."""
        if interpreted():
            return _compile_in_child(self, keep_asm)
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        mod = self.module
        target = GPUTarget("cuda", 90, 32)
        facts = {}
        for name, sig, div, kw in self.signatures():
            fn = getattr(mod, name)
            attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div}
            src = ASTSource(fn, sig, constexprs={}, attrs=attrs)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    ck = triton.compile(src, target=target, options=dict(kw))
            except Exception as e:  # noqa: BLE001 - any compiler failure is a failed trial
                raise CompileError(f"{name} ({self.static}, {self.config}): "
                                   f"{type(e).__name__}: {e}") from e
            cubin = ck.asm.get("cubin", b"")
            facts[name] = {"shared": ck.metadata.shared, "num_warps": ck.metadata.num_warps,
                           "ptx_bytes": len(ck.asm.get("ptx", "")), "cubin_bytes": len(cubin),
                           **_resource_usage(cubin, name)}
            if keep_asm:
                facts[name]["_asm"] = ck.asm
        return facts
