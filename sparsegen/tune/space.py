"""The search space of one kernel: which backend, then that backend's tunables.

Optuna sees a conditional categorical space: `backend`, then `<backend>.<tunable>` for the
chosen backend only. Static feasibility (shared memory, registers, divisibility, tile vs
group size: the adapter's `check_config`) is decided here on the CPU; an infeasible
candidate is reported with `trial.set_constraint` and pruned before any GPU time, so the
sampler learns to avoid that region.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

import optuna

CONSTRAINT = "static_feasibility"  # > 0: the config cannot run on the target
ENUMERATE_LIMIT = 200_000          # spaces up to this size are counted exactly


@dataclass(frozen=True)
class Candidate:
    backend: str
    config: dict = field(hash=False)

    @property
    def key(self) -> str:
        """Canonical text of the candidate: equal configs, equal keys."""
        return json.dumps({"backend": self.backend, "config": self.config}, sort_keys=True)

    def describe(self) -> str:
        return f"{self.backend} " + " ".join(f"{k}={v}" for k, v in sorted(self.config.items()))


class SearchSpace:
    def __init__(self, kernel):
        self.kernel = kernel
        self.adapters = {b: kernel.adapter_cls(b) for b in kernel.backends}
        self.choices = {}
        for b, cls in self.adapters.items():
            space = {name: list(values) for name, values in
                     cls.tunable_space(kernel.static).items()}
            # the default is always a point of the space, so it can be enqueued as a trial
            for name, value in cls.default_config(kernel.static).items():
                if name in space and value not in space[name]:
                    space[name].append(value)
            self.choices[b] = space
        self._feasible_count = None

    # --- sampling ----------------------------------------------------------------------
    def suggest(self, trial: optuna.Trial) -> Candidate:
        backend = trial.suggest_categorical("backend", list(self.adapters))
        config = {name: trial.suggest_categorical(f"{backend}.{name}", values)
                  for name, values in self.choices[backend].items()}
        return Candidate(backend, config)

    def params(self, cand: Candidate) -> dict:
        """Optuna params of a candidate (for enqueue_trial)."""
        return {"backend": cand.backend,
                **{f"{cand.backend}.{k}": v for k, v in cand.config.items()}}

    @staticmethod
    def from_params(params: dict) -> Candidate:
        backend = params["backend"]
        prefix = backend + "."
        return Candidate(backend, {k[len(prefix):]: v for k, v in params.items()
                                   if k.startswith(prefix)})

    # --- feasibility -------------------------------------------------------------------
    def infeasibility(self, cand: Candidate) -> str | None:
        """Why the candidate cannot run (from the adapter's static checks), or None."""
        try:
            return self.adapters[cand.backend].check_config(self.kernel.static, cand.config)
        except Exception as e:  # noqa: BLE001 - a check that throws is a verdict too
            return f"check_config raised {type(e).__name__}: {e}"

    @staticmethod
    def mark_infeasible(trial: optuna.Trial, reason: str) -> None:
        trial.set_constraint(CONSTRAINT, 1.0)
        trial.set_user_attr("outcome", "infeasible")
        trial.set_user_attr("reason", reason[:500])

    def defaults(self) -> list[Candidate]:
        """Each backend's heuristic default that is feasible, in the spec's backend order
        (the first is the fallback the emitted module uses)."""
        out = []
        for backend, cls in self.adapters.items():
            cand = Candidate(backend, dict(cls.default_config(self.kernel.static)))
            if self.infeasibility(cand) is None and self.contains(cand):
                out.append(cand)
        return out

    def seeds(self) -> list[Candidate]:
        """The feasible points of the space an adapter names as worth measuring early
        (its optional `seed_configs(static)`: e.g. one per value of a key that decides
        the work split, which a few sampled trials could miss), after the defaults."""
        out = []
        for backend, cls in self.adapters.items():
            for config in getattr(cls, "seed_configs", lambda static: [])(self.kernel.static):
                cand = Candidate(backend, dict(config))
                if self.infeasibility(cand) is None and self.contains(cand):
                    out.append(cand)
        return out

    def _holding(self, cand: Candidate) -> dict | None:
        """The choices of cand's backend if they hold each of cand's keys and values (cand
        may lack keys), else None."""
        space = self.choices.get(cand.backend)
        if space is None or any(k not in space or v not in space[k]
                                for k, v in cand.config.items()):
            return None
        return space

    def contains(self, cand: Candidate) -> bool:
        """Whether cand is a point of the space (one of its backends, every key, every value
        among the choices)."""
        space = self._holding(cand)
        return space is not None and set(space) == set(cand.config)

    def completions(self, cand: Candidate, limit: int = 16) -> list[Candidate]:
        """The feasible points of the space that agree with cand on every key it has: cand
        itself when complete; one per combination of a missing key's choices when the
        space gained keys since cand was recorded (at most `limit`). Empty when cand has a
        backend, key or value the space no longer holds."""
        space = self._holding(cand)
        if space is None:
            return []
        missing = [k for k in space if k not in cand.config]
        out = []
        for values in itertools.product(*(space[k] for k in missing)):
            full = Candidate(cand.backend, {**cand.config, **dict(zip(missing, values))})
            if self.infeasibility(full) is None:
                out.append(full)
            if len(out) == limit:
                break
        return out

    def size(self) -> int:
        total = 0
        for space in self.choices.values():
            n = 1
            for values in space.values():
                n *= len(values)
            total += n
        return total

    def feasible_count(self) -> int | None:
        """Feasible candidates in the whole space (None when too large to enumerate)."""
        if self._feasible_count is None and self.size() <= ENUMERATE_LIMIT:
            count = 0
            for backend, space in self.choices.items():
                names = list(space)
                for values in itertools.product(*space.values()):
                    cand = Candidate(backend, dict(zip(names, values)))
                    count += self.infeasibility(cand) is None
            self._feasible_count = count
        return self._feasible_count
