"""Block scores that exercise a top-k selection's ranking, shared by the CPU (interpreter)
and GPU selection tests."""
from __future__ import annotations

import torch


def tricky_scores(B: int, H: int, NB: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """[B, H, NB] random scores with a long run of ties (row 0), a batch entry drawn from
    three values (ties everywhere), and NaN / -0.0 / +inf / -inf in the last row."""
    s = torch.randn(B, H, NB, generator=gen, device=device)
    s[0, 0, : NB // 2] = 0.25
    s[1 % B] = torch.randint(0, 3, (H, NB), generator=gen, device=device).float()
    for j, v in enumerate((float("nan"), -0.0, float("inf"), float("-inf")), start=1):
        s[-1, -1, j % NB] = v
    return s
