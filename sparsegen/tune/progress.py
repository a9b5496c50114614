"""Progress display of a tuning study: trials done, failures, best so far.

On a terminal one line per study is rewritten in place; in a log (CI) each evaluated trial
gets its own line, so a failure's reason is never overwritten.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass



@dataclass
class Tally:
    measured: int = 0
    failed: int = 0
    infeasible: int = 0
    best: float | None = None
    best_label: str = ""


def tally(trials, describe) -> Tally:
    t = Tally()
    for tr in trials:
        if not tr.state.is_finished():
            continue  # its outcome may be set while its value is not yet
        outcome = tr.user_attrs.get("outcome")
        if outcome == "measured":
            t.measured += 1
            if t.best is None or tr.value < t.best:
                t.best, t.best_label = tr.value, describe(tr)
        elif outcome == "failed":
            t.failed += 1
        elif outcome == "infeasible":
            t.infeasible += 1
    return t


class Progress:
    def __init__(self, label: str, budget: int, describe, stream=None):
        self.label = label
        self.budget = budget
        self.describe = describe  # FrozenTrial -> short text of its candidate
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def line(self, t: Tally) -> str:
        best = f"best {t.best:.4f} ms ({t.best_label})" if t.best is not None else "no best yet"
        return (f"[{self.label}] {t.measured + t.failed}/{self.budget} evaluated, "
                f"{t.failed} failed, {t.infeasible} infeasible | {best}")

    def __call__(self, study, trial) -> None:
        """Optuna callback after each finished trial."""
        t = tally(study.get_trials(deepcopy=False), self.describe)
        outcome = trial.user_attrs.get("outcome")
        if self.tty:
            self._write("\r\x1b[K" + self.line(t))
        elif outcome in ("measured", "failed"):
            what = (f"{trial.value:.4f} ms" if outcome == "measured" else
                    f"FAILED ({trial.user_attrs.get('fail_kind', '?')}: "
                    f"{trial.user_attrs.get('reason', '')[:160]})")
            self._write(f"[{self.label}] trial {trial.number} {self.describe(trial)}: {what}\n"
                        f"  {self.line(t)}\n")

    def message(self, text: str) -> None:
        self._write(("\r\x1b[K" if self.tty else "") + f"[{self.label}] {text}\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
