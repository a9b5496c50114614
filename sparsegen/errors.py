"""User-facing errors: each one names what is wrong and what would be right.

The CLI prints these as one line and exits non-zero; nothing else reaches the user as a
traceback.
"""
from __future__ import annotations


class SparsegenError(Exception):
    """An error the user can fix; str() is the whole message."""


class SpecError(SparsegenError):
    def __init__(self, file: str, path: str, value, allowed: str):
        self.file, self.path, self.value, self.allowed = file, path, value, allowed
        shown = _show(value)
        where = f"{file}: {path}" if path else file
        super().__init__(f"{where} = {shown}: {allowed}" if path else f"{where}: {allowed}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
