"""Optuna studies, one per (kernel, shape bucket): the search loop of `sparsegen tune`.

The kernels are the attention kernel (plan.kernels) and the rule's selection-side kernels
(plan.rule_kernels, over the same shape buckets); a rule kernel whose adapter has no
bench_inputs / reference cannot be measured and is skipped with a note.

Per study:
  * skipped entirely when the tuning database already holds a winner for this GPU, kernel
    identity, shape and library versions (a warm database does no GPU work), unless
    `retune`: then that winner is enqueued beside the defaults and the study searches on, so
    the new winner is never worse than the old one measured in the same run;
  * the heuristic default config of each backend is enqueued first, so the winner is never
    worse than the default;
  * with no winner for today's kernel, the winner an earlier version of it recorded (the
    templates or adapter changed since: a stale entry) is enqueued next, completed with
    each choice of any config key added since, so a small budget re-tunes after an edit;
  * then the seeds its adapter names (`seed_configs`, if any); every enqueued candidate is
    measured, even where they outnumber the budget;
  * each trial: sample a candidate, reject it on the CPU if statically infeasible
    (`trial.set_constraint`, pruned), reuse the result of an identical finished candidate,
    compile it in a CPU child process (threads run several trials at once, so compiles
    overlap with GPU work), then gate and time it in the GPU child process, one at a time;
    a crash, hang, out-of-memory or wrong answer is a FAIL trial with its reason;
  * the budget counts evaluated candidates (measured or failed), shared by every worker on
    the study; the study is also done when every feasible candidate has been evaluated;
  * studies live in storage: an embedded journal file by default (an interrupted `tune`
    resumes where it stopped), or `--storage URL` (PostgreSQL through Optuna's RDB storage)
    to share one study between workers on one or many hosts.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..errors import SparsegenError
from ..plan import rule_kernel_plans
from .bench import workload_of
from .db import (GpuId, TuningDB, backend_label, identity_key, kernel_identity,
                 library_versions)
from .progress import Progress, tally
from .space import Candidate, SearchSpace
from .worker import ChildWorker, WorkerPool

OWNER = f"{socket.gethostname()}:{os.getpid()}"
COUNTED = ("measured", "failed")  # outcomes that use up the trial budget


@dataclass(frozen=True)
class Targets:
    """Functions the child processes run ('module:function'); tests substitute CPU ones."""

    prepare: str = "sparsegen.tune.bench:prepare"
    evaluate: str = "sparsegen.tune.bench:evaluate"
    compile: str = "sparsegen.tune.worker:compile_candidate"


@dataclass
class TuneOptions:
    gpu: GpuId
    db: TuningDB
    trials: int
    timeout_s: float = 60.0
    workers: int = 2
    storage: str | None = None
    cache_dir: Path | None = None
    build_dir: Path | None = None
    seed: int = 0
    tolerance: float = 1e-2
    targets: Targets = field(default_factory=Targets)
    compile_timeout_s: float | None = None   # default: max(timeout_s, 180)
    prepare_timeout_s: float = 600.0
    stream: object = None                    # progress output (stderr)
    kernels: tuple[str, ...] = ()            # tune only these kernels (empty: all)
    shapes: tuple[str, ...] = ()             # tune only these buckets, e.g. "b16_s32768"
    retune: bool = False                     # search again where the database has a winner
    time_limit_s: float | None = None        # the whole run: a study under way when it
                                             # passes stops early (its best so far is
                                             # recorded), later ones are skipped


@dataclass
class ShapeResult:
    kernel: str
    shape: str
    status: str           # warm | tuned | failed | skipped | deferred (time limit)
    entry: dict | None = None
    message: str = ""


class CandidateFailed(Exception):
    """A candidate that failed to compile, crashed, hung, ran out of memory or was wrong."""


# ---------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------
def cache_dir() -> Path:
    env = os.environ.get("SPARSEGEN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsegen"


def redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def open_storage(url: str | None, default_dir: Path | None = None):
    """Optuna storage for `--storage URL`; the embedded journal file without one."""
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    if url is None or url.startswith("journal:"):
        path = Path(url[len("journal:"):]) if url else (default_dir or cache_dir()) / \
            "studies.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if not re.match(r"^(postgresql|mysql|sqlite)(\+\w+)?://", url):
        raise SparsegenError(
            f"--storage {redact(url)!r}: give an RDB URL (postgresql://USER:PASS@HOST/DB, "
            "sqlite:///PATH) or journal:PATH for a local journal file")
    url = _with_installed_driver(url)
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url, engine_kwargs={"pool_pre_ping": True},
                    # a worker that dies mid-trial is noticed by the others, its trial re-queued
                    heartbeat_interval=10, grace_period=60,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
        except ImportError as e:
            raise SparsegenError(f"--storage {redact(url)}: the database driver is missing "
                                 f"({e}); for PostgreSQL: pip install psycopg2-binary") from None
        except Exception as e:  # noqa: BLE001 - connection errors come in many types
            text = str(e)
            # workers that start together on an empty database race to create Optuna's
            # tables; the loser finds them on the next try
            if attempt < 4 and ("already exists" in text or "duplicate key" in text):
                time.sleep(0.5 * (attempt + 1))
                continue
            first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            raise SparsegenError(f"--storage {redact(url)}: cannot open the study storage: "
                                 f"{first[:300]}") from None


def _with_installed_driver(url: str) -> str:
    """postgresql:// names no driver and SQLAlchemy 2.1 then wants psycopg 3; use
    psycopg2 (the `test` extra's psycopg2-binary) where that is what is installed."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://" + url[len("postgresql://"):]
    return url


def study_name(identity: dict, shape, gpu: GpuId, versions: dict) -> str:
    vh = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:8]
    return f"{identity['name']}-{identity_key(identity)}/{shape.key}/{gpu.slug}/{vh}"


# ---------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------
def tune_plan(plan, opts: TuneOptions) -> list[ShapeResult]:
    """Tune every (kernel, shape) of the plan that the database lacks; record winners."""
    versions = library_versions()
    results, todo = [], []
    for kernel in _selected_kernels(opts, list(plan.kernels) + rule_kernel_plans(plan)):
        if not getattr(kernel, "tunable", True):
            note = (f"{kernel.adapter.__name__} has no bench_inputs/reference to measure it "
                    "with; not tuned (its default config is used)")
            results.append(ShapeResult(kernel.name, "-", "skipped", None, note))
            continue
        identity = kernel_identity(kernel)
        for shape in kernel.shapes:
            if opts.shapes and shape.key not in opts.shapes:
                continue
            entry = opts.db.lookup(opts.gpu, identity, _shape(shape), versions)
            if entry is not None and not opts.retune:
                results.append(ShapeResult(kernel.name, shape.key, "warm", entry))
            else:
                todo.append((kernel, identity, shape, entry))
    if not todo:
        return results
    if opts.targets == Targets():
        _require_cuda(opts.gpu, todo)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(opts.storage, opts.cache_dir)
    session = _Session(opts, storage, versions)
    try:
        spaces = {}
        for kernel, identity, shape, prior in todo:
            if session.out_of_time():
                results.append(ShapeResult(kernel.name, shape.key, "deferred", None, (
                    f"not started, the run reached its time limit ({opts.time_limit_s:g} s); "
                    "`tune` again picks it up")))
                continue
            space = spaces.setdefault(id(kernel), SearchSpace(kernel))
            results.append(session.tune_shape(kernel, identity, shape, space, prior))
    finally:
        session.close()
    return results


def _selected_kernels(opts: TuneOptions, kernels) -> list:
    """The kernels --kernels names (all without it), after checking that --kernels and
    --shapes name only what the plan has (a typo would tune nothing)."""
    names = sorted({k.name for k in kernels})
    unknown = sorted(set(opts.kernels) - set(names))
    if unknown:
        raise SparsegenError(f"--kernels {' '.join(unknown)}: not in this spec's plan; its "
                             f"kernels are {', '.join(names)}")
    chosen = [k for k in kernels if not opts.kernels or k.name in opts.kernels]
    keys = sorted({s.key for k in chosen for s in k.shapes})
    unknown = sorted(set(opts.shapes) - set(keys))
    if unknown:
        raise SparsegenError(f"--shapes {' '.join(unknown)}: no such bucket for the chosen "
                             f"kernels; they have {', '.join(keys)}")
    return chosen


def _require_cuda(gpu: GpuId, todo) -> None:
    import torch

    if not torch.cuda.is_available():
        missing = [(k, s) for k, _, s, prior in todo if prior is None]
        named = missing or [(k, s) for k, _, s, _ in todo]  # else: all are --retune's
        what = ", ".join(f"{k.name} {s.key}" for k, s in named[:4])
        more = f" and {len(named) - 4} more" if len(named) > 4 else ""
        if missing:
            raise SparsegenError(
                f"the tuning database has no entry for {gpu} and {what}{more}; tuning them "
                "needs a CUDA GPU and this machine has none")
        raise SparsegenError(
            f"--retune measures {what}{more} again on {gpu}: that needs a CUDA GPU and this "
            "machine has none (without --retune the database's entries are used as they are)")


def _shape(shape) -> dict:
    return {"batch": shape.batch, "seq_len": shape.seq_len}


class _Session:
    """Child processes and storage shared by the studies of one `tune` run."""

    def __init__(self, opts: TuneOptions, storage, versions: dict):
        self.opts = opts
        self.storage = storage
        self.versions = versions
        self.log_dir = (opts.cache_dir or cache_dir()) / "logs"
        self.gpu = ChildWorker("gpu", self.log_dir)
        self.gpu_lock = threading.Lock()
        self.compilers = WorkerPool(opts.workers, "compile", self.log_dir)
        self.compile_timeout = opts.compile_timeout_s or max(opts.timeout_s, 180.0)
        self.deadline = (None if opts.time_limit_s is None
                         else time.monotonic() + opts.time_limit_s)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def close(self) -> None:
        self.gpu.close()
        self.compilers.close()

    def tune_shape(self, kernel, identity, shape, space: SearchSpace,
                   prior: dict | None = None) -> ShapeResult:
        name = study_name(identity, shape, self.opts.gpu, self.versions)
        study = _ShapeStudy(self, kernel, identity, shape, space, name, prior)
        return study.run()


class _ShapeStudy:
    def __init__(self, session: _Session, kernel, identity, shape, space, name,
                 prior: dict | None = None):
        self.s = session
        self.prior = prior  # the database's entry being retuned
        self.opts = session.opts
        self.kernel, self.identity, self.shape, self.space = kernel, identity, shape, space
        self.name = name
        self.workload = workload_of(kernel, shape, seed=self.opts.seed)
        self.budget = self.opts.trials   # raised in run() to cover every enqueued candidate
        self.abort: str | None = None
        shared = self.opts.storage is not None
        seed = self.opts.seed + (os.getpid() if shared else 0)  # workers explore differently
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=seed % (2 ** 32), multivariate=True, group=True, constant_liar=True,
                n_startup_trials=max(2, min(10, self.budget // 3)))
        self.study = optuna.create_study(study_name=name, storage=session.storage,
                                         sampler=sampler, direction="minimize",
                                         load_if_exists=True)
        label = f"{kernel.name} {shape.key}"
        self.progress = Progress(label, self.budget, self._describe, self.opts.stream)

    # --- the loop ----------------------------------------------------------------------
    def run(self) -> ShapeResult:
        study = self.study
        reap_dead_owner_trials(study)
        fresh = not study.get_trials(deepcopy=False)
        if fresh:
            for cand in self.space.defaults():
                study.enqueue_trial(self.space.params(cand), user_attrs={"default": True},
                                    skip_if_exists=True)
        self._enqueue_prior(study)   # a known winner before the adapter's guesses
        if fresh:
            for cand in self.space.seeds():
                study.enqueue_trial(self.space.params(cand), user_attrs={"seed": True},
                                    skip_if_exists=True)
        # every enqueued candidate is measured, past the budget if need be: a budget the
        # defaults and seeds fill would drop the previous winner, and the re-tune could
        # record a slower one (an H100 re-tune at --trials 4 did; bench/NOTES.md, Session 21)
        queued = [t for t in study.get_trials(deepcopy=False)
                  if t.user_attrs.keys() & {"default", "seed", "prior"}]
        self.budget = self.progress.budget = max(self.opts.trials, len(queued))
        if self._done():
            self.progress.message("study already complete (resumed)")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeat/experimental notices
                study.optimize(self._objective, n_jobs=max(1, self.opts.workers),
                               catch=(CandidateFailed,), gc_after_trial=False,
                               callbacks=[self.progress, self._stop_when_done])
        self._wait_for_running()
        if self.abort:
            self.progress.message(f"FAILED: {self.abort}")
            return ShapeResult(self.kernel.name, self.shape.key, "failed", None, self.abort)
        entry = self._entry()
        if entry is None:
            reason = self._common_failure()
            self.progress.message(f"no candidate passed: {reason}")
            return ShapeResult(self.kernel.name, self.shape.key, "failed", None,
                               f"no candidate passed ({reason})")
        self.opts.db.record(self.opts.gpu, self.identity, entry)
        best, default = entry["best"], entry["default"]
        gain = (f", {default['median_ms'] / best['median_ms']:.2f}x the default"
                if default["median_ms"] else "")
        bw = f", {best['bandwidth_gbs']:.0f} GB/s" if best["bandwidth_gbs"] else ""
        self.progress.message(f"best {best['median_ms']:.4f} ms{bw} "
                              f"({best['backend']} {best['config']}){gain}")
        note = ""
        if not self._done():  # stopped by the run's time limit
            evaluated = entry["trials"]["measured"] + entry["trials"]["failed"]
            note = (f"stopped by the time limit after {evaluated} of {self.budget} candidates; "
                    "`tune --retune` searches on from here")
            self.progress.message(note)
        return ShapeResult(self.kernel.name, self.shape.key, "tuned", entry, note)

    def _enqueue_prior(self, study) -> None:
        """The winner being retuned, or else the one an earlier version of this kernel
        recorded, measured again beside the new candidates (unless the space no longer
        holds it: a config key or value since removed). A key the space gained since is
        tried at each of its choices."""
        entry, what = self.prior, "the recorded winner"
        if entry is None:
            entry = self.opts.db.predecessor(self.opts.gpu, self.identity, _shape(self.shape))
            what = "the winner of this kernel's previous version"
        if entry is None:
            return
        best = entry["best"]
        recorded = Candidate(best["backend"], dict(best["config"]))
        cands = self.space.completions(recorded)
        if not cands:
            self.progress.message(f"{what} {recorded.describe()} is not in today's space; "
                                  "searching without it")
            return
        if self.prior is None:
            self.progress.message(f"seeded with {what} ({recorded.describe()}, "
                                  f"{best['median_ms']:.4f} ms then)")
        for cand in cands:
            study.enqueue_trial(self.space.params(cand), user_attrs={"prior": True},
                                skip_if_exists=True)

    def _objective(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("owner", OWNER)
        cand = self.space.suggest(trial)
        reason = self.space.infeasibility(cand)
        if reason:
            self.space.mark_infeasible(trial, reason)
            raise optuna.TrialPruned(reason)
        prior = self._reserve(trial, cand)
        if prior is not None:
            trial.set_user_attr("repeat_of", prior.number)
            if prior.state != TrialState.COMPLETE:
                # pruned as infeasible, not failed: the sampler ignores failed trials and
                # would keep proposing this candidate
                self.space.mark_infeasible(trial, f"failed in trial {prior.number}: "
                                           + prior.user_attrs.get("reason", ""))
            trial.set_user_attr("outcome", "repeat")
            if prior.state != TrialState.COMPLETE:
                raise optuna.TrialPruned("failed before")
            return prior.value
        return self._evaluate(trial, cand)

    def _evaluate(self, trial, cand: Candidate) -> float:
        task = {"adapter": _class_path(self.space.adapters[cand.backend]),
                "static": self.kernel.static.as_dict(),
                "static_cls": _class_path(type(self.kernel.static)), "config": cand.config,
                "backend": cand.backend,
                "build_dir": str(self.opts.build_dir) if self.opts.build_dir else None,
                "workload": self.workload, "trial": trial.number, "study": self.name,
                "tolerance": self.opts.tolerance}
        with self.s.compilers.worker() as w:
            out = w.call(self.opts.targets.compile, task, self.s.compile_timeout)
        if not out.ok:
            self._fail(trial, out.kind, out.reason)
        trial.set_user_attr("compile", _compact(out.value))
        with self.s.gpu_lock:
            self._prepare()
            if self.abort:
                trial.set_user_attr("outcome", "skipped")
                raise optuna.TrialPruned(self.abort)
            out = self.s.gpu.call(self.opts.targets.evaluate, task, self.opts.timeout_s)
        if not out.ok:
            self._fail(trial, out.kind, out.reason)
        result = out.value
        for k in ("median_ms", "plain_ms", "graph_ms", "bandwidth_gbs", "max_rel_err"):
            if k in result:
                trial.set_user_attr(k, result[k])
        trial.set_user_attr("outcome", "measured")
        return float(result["median_ms"])

    def _fail(self, trial, kind: str, reason: str):
        trial.set_user_attr("outcome", "failed")
        trial.set_user_attr("fail_kind", kind)
        trial.set_user_attr("reason", reason[:800])
        raise CandidateFailed(f"{kind}: {reason}")

    def _prepare(self) -> None:
        """Inputs of this shape in the GPU child (again after it was restarted)."""
        gpu = self.s.gpu
        if gpu.alive and gpu.state.get("workload") == self.workload:
            return
        out = gpu.call(self.opts.targets.prepare, self.workload, self.opts.prepare_timeout_s)
        if not out.ok:
            self.abort = f"cannot prepare inputs ({out.kind}): {out.reason}"
            self.study.stop()
            return
        gpu.state["workload"] = self.workload
        gpu.state["summary"] = out.value

    # --- bookkeeping on the shared study -----------------------------------------------
    def _trials(self, states=None):
        return fresh_trials(self.study, states)

    def _reserve(self, trial, cand: Candidate):
        """Reserve the candidate for this trial (returns None), or return the finished trial
        whose result it reuses. Raises TrialPruned when the budget is spent.

        Trials on any thread or host agree through the storage alone: a trial announces
        its `intent` for a candidate, then looks for rivals (running trials with the same
        candidate). It commits (`evaluating`) only with no rival left; it withdraws for a
        rival that committed or has a lower number, and waits for the result. Two rivals
        never both miss each other (each writes before it reads), so at most one
        evaluates a candidate. Each decision reads one snapshot of the study, so a rival
        that finishes between two reads is never missed."""
        intent, polls = False, 0
        while True:
            trials = self._trials()
            prior = self._finished_same(trials, cand)
            if prior is not None:
                if intent:
                    trial.set_user_attr("intent", False)
                return prior
            rivals = [t for t in trials if t.state == TrialState.RUNNING
                      and t.number != trial.number and t.user_attrs.get("intent")
                      and SearchSpace.from_params(t.params).key == cand.key]
            committed = any(r.user_attrs.get("evaluating") for r in rivals)
            if not intent and not committed:
                trial.set_user_attr("intent", True)
                intent = True
                continue
            if intent and not rivals:
                self._commit(trial)
                return None
            if intent and (committed or any(r.number < trial.number for r in rivals)):
                trial.set_user_attr("intent", False)
                intent = False
            if intent:
                time.sleep(0.05)  # only higher-numbered rivals, still deciding
                continue
            polls += 1
            if polls % 25 == 0:  # a rival whose worker died must not block us for good
                reap_dead_owner_trials(self.study)
                optuna.storages.fail_stale_trials(self.study)
            time.sleep(0.2)  # wait for the rival's result

    def _commit(self, trial) -> None:
        """Mark the trial as evaluating, then check that fewer than `budget` candidates with
        a lower number were (or are being) evaluated: workers racing for the last slot are
        ordered by trial number, so a few may overshoot and none undershoots."""
        trial.set_user_attr("evaluating", True)
        used = 0
        for t in self._trials():
            if t.number >= trial.number or not t.user_attrs.get("evaluating"):
                continue
            if t.state == TrialState.RUNNING or t.user_attrs.get("outcome") in COUNTED:
                used += 1
        if self.abort or used >= self.budget:
            trial.set_user_attr("intent", False)
            trial.set_user_attr("outcome", "skipped")
            self.study.stop()
            raise optuna.TrialPruned("budget reached")

    @staticmethod
    def _finished_same(trials, cand: Candidate):
        for t in trials:
            if t.state.is_finished() and t.user_attrs.get("outcome") in COUNTED and \
                    SearchSpace.from_params(t.params).key == cand.key:
                return t
        return None

    @property
    def cap(self) -> int:
        """The most trials a study may hold: repeats and infeasible draws included."""
        return self.budget * 5 + 50

    def _done(self) -> bool:
        trials = self._trials()
        counted = [t for t in trials if t.user_attrs.get("outcome") in COUNTED]
        if len(counted) >= self.budget or len(trials) >= self.cap or self.abort:
            return True
        feasible = self.space.feasible_count()
        distinct = {SearchSpace.from_params(t.params).key for t in counted}
        return feasible is not None and len(distinct) >= feasible

    def _stop_when_done(self, study, trial) -> None:
        if self._done() or self.s.out_of_time():
            study.stop()

    def _wait_for_running(self) -> None:
        """Let other workers' trials of this study finish, so every worker sees the same
        trials and picks the same best."""
        deadline = time.monotonic() + self.opts.timeout_s + self.s.compile_timeout + 60
        while time.monotonic() < deadline:
            reap_dead_owner_trials(self.study)
            if not self._trials((TrialState.RUNNING,)):
                return
            time.sleep(0.5)

    # --- the result --------------------------------------------------------------------
    def _measured(self):
        return [t for t in self._trials((TrialState.COMPLETE,))
                if t.user_attrs.get("outcome") == "measured"]

    def _entry(self) -> dict | None:
        measured = self._measured()
        if not measured:
            return None
        best = min(measured, key=lambda t: (t.value, t.number))
        cand = SearchSpace.from_params(best.params)
        defaults = self.space.defaults()
        default = defaults[0] if defaults else cand
        dtrial = next((t for t in sorted(measured, key=lambda t: t.number)
                       if SearchSpace.from_params(t.params).key == default.key), None)
        t = tally(self._trials(), self._describe)
        return {
            "shape": _shape(self.shape),
            "selected_blocks": self.kernel.selected_blocks(self.shape.seq_len),
            "versions": self.s.versions,
            "best": {"backend": cand.backend, "config": cand.config,
                     "median_ms": _round(best.value),
                     "plain_ms": _round(best.user_attrs.get("plain_ms")),
                     "graph_ms": _round(best.user_attrs.get("graph_ms")),
                     "bandwidth_gbs": _round(best.user_attrs.get("bandwidth_gbs"))},
            "default": {"backend": default.backend, "config": default.config,
                        "median_ms": _round(dtrial.value) if dtrial else None},
            "trials": {"measured": t.measured, "failed": t.failed, "infeasible": t.infeasible},
            "study": self.name,
            "tuned_at": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ"),
        }

    def _common_failure(self) -> str:
        reasons = [f"{t.user_attrs.get('fail_kind')}: {t.user_attrs.get('reason', '')[:200]}"
                   for t in self._trials((TrialState.FAIL,))
                   if t.user_attrs.get("outcome") == "failed"]
        if not reasons:
            return "no feasible candidate"
        top = max(set(reasons), key=reasons.count)
        return f"{len(reasons)} failed; most often {top}"

    def _describe(self, trial) -> str:
        if "backend" not in trial.params:
            return "?"
        return SearchSpace.from_params(trial.params).describe()


def fresh_trials(study, states=None):
    """All trials as the storage has them now. Optuna's RDB cache skips a trial whose
    insert commits after a later-numbered trial was seen finished (ids are handed out
    before commit), so a racing worker's trial can stay invisible; read the backend."""
    from optuna.storages._cached_storage import _CachedStorage

    storage = study._storage
    if isinstance(storage, _CachedStorage):
        storage = storage._backend
    return storage.get_all_trials(study._study_id, deepcopy=False, states=states)


def reap_dead_owner_trials(study) -> list[int]:
    """Fail RUNNING trials whose owner process on this host is gone (an interrupted `tune`)
    and queue their candidates again, so resuming loses no trial. Trials of other hosts are
    left to the RDB heartbeat."""
    host = socket.gethostname()
    reaped = []
    for t in fresh_trials(study, (TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner", "")
        o_host, _, pid = owner.rpartition(":")
        if o_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:  # attributes first: a finished trial can no longer be changed
            study._storage.set_trial_user_attr(t._trial_id, "outcome", "interrupted")
            study._storage.set_trial_user_attr(t._trial_id, "reason", f"worker {owner} exited")
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker reaped it first
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        reaped.append(t.number)
    return reaped


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _round(x):
    """6 significant digits: timings are not more precise, and the files stay readable."""
    return None if x is None else float(f"{x:.6g}")


def _class_path(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _compact(facts) -> dict:
    """The compile facts worth keeping in the study (registers, spills, shared memory)."""
    out = {}
    if isinstance(facts, dict):
        for kernel, f in facts.items():
            if isinstance(f, dict):
                out[kernel] = {k: f[k] for k in ("n_regs", "spill_stores", "shared")
                               if k in f}
    return out


def print_summary(results: list[ShapeResult], stream=None) -> None:
    stream = stream or sys.stdout
    for r in results:
        if r.status == "skipped":
            print(f"{r.status:6} {r.kernel}: {r.message}", file=stream)
        elif r.entry:
            b, d = r.entry["best"], r.entry["default"]
            gain = f" {d['median_ms'] / b['median_ms']:.2f}x vs default" if d["median_ms"] else ""
            bw = f" {b['bandwidth_gbs']:.0f} GB/s" if b.get("bandwidth_gbs") else ""
            cut = f" ({r.message})" if r.message else ""
            print(f"{r.status:6} {r.kernel} {r.shape}: {backend_label(b['backend'], b['config'])} "
                  f"{b['median_ms']:.4f} ms"
                  f"{bw}{gain}{cut}", file=stream)
        else:
            print(f"{r.status:6} {r.kernel} {r.shape}: {r.message}", file=stream)
