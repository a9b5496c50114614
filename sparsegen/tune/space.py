"""The search space of one kernel: which backend, then that backend's tunables.

Optuna sees a conditional categorical space: `backend`, then `<backend>.<tunable>` for the
chosen backend only. A backend whose config has an `algo` key (a form whose other keys are
its own: block_select's radix / TileLang selects, entmax_tau's Triton pair / TileLang kernel)
branches once more: `<backend>/algo`, then `<backend>/<algo>.<tunable>` over the values that
some feasible config of that form takes (the space's feasible points projected, when the
space is small enough to enumerate), so a trial stops drawing one form's keys at values only
the other form can run. Static feasibility (shared memory, registers, divisibility, tile vs
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
BRANCH_KEY = "algo"                # a config key that picks a form with keys of its own


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
        self._feasible: dict[str, list[dict]] = {}   # backend -> feasible configs
        self._branches: dict[str, dict | None] = {}

    # --- sampling ----------------------------------------------------------------------
    def suggest(self, trial: optuna.Trial) -> Candidate:
        backend = trial.suggest_categorical("backend", list(self.adapters))
        branches = self.branches(backend)
        if branches is None:
            config = {name: trial.suggest_categorical(f"{backend}.{name}", values)
                      for name, values in self.choices[backend].items()}
        else:
            form = trial.suggest_categorical(f"{backend}/{BRANCH_KEY}", list(branches))
            config = {BRANCH_KEY: form, **{
                name: trial.suggest_categorical(f"{backend}/{form}.{name}", values)
                for name, values in branches[form].items()}}
        return Candidate(backend, config)

    def params(self, cand: Candidate) -> dict:
        """Optuna params of a candidate (for enqueue_trial), named as suggest() names them."""
        b, form = cand.backend, cand.config.get(BRANCH_KEY)
        branches = self.branches(b)
        if branches is None or form not in branches:
            return {"backend": b, **{f"{b}.{k}": v for k, v in cand.config.items()}}
        return {"backend": b, f"{b}/{BRANCH_KEY}": form,
                **{f"{b}/{form}.{k}": v for k, v in cand.config.items() if k != BRANCH_KEY}}

    @staticmethod
    def from_params(params: dict) -> Candidate:
        """The candidate of a trial's params, flat (`b.key`) or branched (`b/algo`,
        `b/<algo>.key`)."""
        backend = params["backend"]
        n = len(backend) + 1
        config = {}
        for k, v in params.items():
            if k.startswith(backend + "."):
                config[k[n:]] = v
            elif k.startswith(backend + "/"):
                config[k[n:].rsplit(".", 1)[-1]] = v
        return Candidate(backend, config)

    def branches(self, backend: str) -> dict | None:
        """{algo value: {key: choices}} of a backend whose space has an `algo` key: per form,
        each other key's values among the form's feasible configs (every value of the
        declared choices, in their order). None without such a key, when the space is too
        large to enumerate, or when no config is feasible."""
        if backend not in self._branches:
            space = self.choices[backend]
            feasible = self._feasible_configs(backend) if BRANCH_KEY in space else None
            out = None
            if feasible:
                out = {}
                for form in space[BRANCH_KEY]:
                    mine = [c for c in feasible if c[BRANCH_KEY] == form]
                    if mine:
                        taken = {k: {c[k] for c in mine} for k in space if k != BRANCH_KEY}
                        out[form] = {k: [v for v in space[k] if v in seen]
                                     for k, seen in taken.items()}
            self._branches[backend] = out
        return self._branches[backend]

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

    def _feasible_configs(self, backend: str) -> list[dict] | None:
        """Every feasible config of a backend (None when the space is too large)."""
        if backend not in self._feasible:
            if self.size() > ENUMERATE_LIMIT:
                return None
            space = self.choices[backend]
            names = list(space)
            configs = (dict(zip(names, values)) for values in itertools.product(*space.values()))
            self._feasible[backend] = [c for c in configs
                                       if self.infeasibility(Candidate(backend, c)) is None]
        return self._feasible[backend]

    def feasible_count(self) -> int | None:
        """Feasible candidates in the whole space (None when too large to enumerate)."""
        if self.size() > ENUMERATE_LIMIT:
            return None
        return sum(len(self._feasible_configs(b)) for b in self.choices)
