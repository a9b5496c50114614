"""Triton's interpreter mode for the CPU kernel tests.

TRITON_INTERPRET must be set before triton is first imported (triton 3.6 decides at import
whether its standard library is interpreted, and cannot mix modes in one process). Test
modules set it with setdefault before importing this; if another module imported triton
first without it, the interpreter tests skip in-process and `rerun_in_interpreter` runs
them in a fresh process instead.
"""
import os
import subprocess
import sys

import pytest

from sparsegen.codegen.triton_kernel import interpreted

INTERPRETED = interpreted()
needs_interp = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported without TRITON_INTERPRET=1 in this process; "
    "the module's test_interpreter_tests_in_subprocess runs these")
only_if_not_interpreted = pytest.mark.skipif(
    INTERPRETED, reason="the interpreter tests ran in this process")


def _rerun(test_file: str, env: dict) -> None:
    """The module's tests but its subprocess test, in a fresh process under env."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           test_file, "-k", "not subprocess"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def rerun_in_interpreter(test_file: str) -> None:
    _rerun(test_file, {**os.environ, "TRITON_INTERPRET": "1"})


def rerun_compiled(test_file: str) -> None:
    """For GPU test modules imported where triton runs interpreted: rerun them compiled."""
    _rerun(test_file, {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
