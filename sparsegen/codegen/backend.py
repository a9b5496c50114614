"""Backend adapters: one class per code generator (Triton, TileLang) for each kernel kind.

An adapter owns one (static params, tile config) pair: it renders its template into the
build directory, compiles it for Hopper without a GPU (CI) and runs it on a GPU.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from .decode_api import DecodeStatic


class CompileError(RuntimeError):
    """A rendered kernel that the backend compiler rejected (a failed tuning trial)."""


class DecodeBackend:
    """Base of the sparse-decode adapters; see decode_api for the runtime contract."""

    name: str = ""
    template: str = ""  # path under templates/, e.g. "triton/sparse_decode.py.j2"

    def __init__(self, static: DecodeStatic, config: dict | None = None,
                 build_dir: Path | None = None):
        self.static = static
        self.config = dict(self.default_config(static) if config is None else config)
        reason = self.check_config(static, self.config)
        if reason:
            raise ValueError(f"{self.name} config {self.config} is infeasible: {reason}")
        self.build_dir = build_dir

    # --- tuning space (CPU only) -------------------------------------------------------
    @classmethod
    def tunable_space(cls, static: DecodeStatic) -> dict[str, list]:
        raise NotImplementedError

    @classmethod
    def default_config(cls, static: DecodeStatic) -> dict:
        raise NotImplementedError

    @classmethod
    def check_config(cls, static: DecodeStatic, config: dict) -> str | None:
        """Why the config cannot run (shared memory, divisibility, ...), or None."""
        raise NotImplementedError

    # --- code generation -----------------------------------------------------------------
    def render(self) -> Path:
        raise NotImplementedError

    def compile_sm90(self) -> dict:
        """Compile for sm_90(a) with no GPU; returns facts about the binary. Raises CompileError."""
        raise NotImplementedError

    def __call__(self, q, k, v, block_indices, block_counts, seq_lens, block_table=None,
                 sm_scale=None, num_splits=None):
        raise NotImplementedError


_ADAPTERS = {
    "triton": ("sparsegen.codegen.triton_decode", "TritonSparseDecode"),
    "tilelang": ("sparsegen.codegen.tilelang_decode", "TileLangSparseDecode"),
}
BACKEND_NAMES = tuple(_ADAPTERS)


def decode_backend(name: str) -> type[DecodeBackend]:
    if name not in _ADAPTERS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES}")
    module, cls = _ADAPTERS[name]
    return getattr(importlib.import_module(module), cls)
