"""CPU stand-ins for the tuner's GPU side, shared by the tuning tests.

* `FakeDecode` / `FakeDecode2`: backend adapters ("fake", "fake2") with a small tunable
  space, static infeasibility (tile * stages > 192) and the torch reference as kernel.
* `prepare` / `evaluate` / `compile`: targets for the child workers. The objective is a
  deterministic function of the config. With FAKE_FAILURES=1 some configs crash (SIGSEGV),
  hang, run out of memory or give wrong results. Every evaluation is appended to $FAKE_LOG
  (one JSON line: study, trial, pid, candidate) so tests can count GPU work.
* `FakeRule` / `FakeRuleNoBench`: rule (selection-side) kernel adapters in the shape of
  sparsegen.codegen.triton_kernel.TritonKernel ("block"/"num_warps" tiles, infeasible when
  block * num_warps > 256); the second lacks bench_inputs, so the tuner must skip it.
* Run as `python -m tests.tune_fakes`, it tunes `fake_plan()` (a worker process for the shared-storage tests).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sparsegen.codegen import backend as _backend
from sparsegen.codegen.backend import CompileError, DecodeBackend
from sparsegen.codegen.decode_api import DecodeStatic
from sparsegen.plan import KernelPlan, ShapeBucket
from sparsegen.tune.worker import CandidateError

FAKE_TEMPLATE = "module/__init__.py.j2"  # any real template: only its hash is used


class FakeDecode(DecodeBackend):
    name = "fake"
    template = FAKE_TEMPLATE

    @classmethod
    def tunable_space(cls, static):
        return {"tile": [16, 32, 64, 128], "warps": [1, 2, 4, 8], "stages": [1, 2, 3]}

    @classmethod
    def default_config(cls, static):
        return {"tile": 32, "warps": 2, "stages": 2}

    @classmethod
    def check_config(cls, static, config):
        if config["tile"] * config["stages"] > 192:
            return f"tile*stages={config['tile'] * config['stages']} exceeds shared memory"
        return None

    def render(self):
        out = Path(self.build_dir or "/tmp/sparsegen-fake-build")
        out.mkdir(parents=True, exist_ok=True)
        stem = "_".join(f"{k}{v}" for k, v in sorted(self.config.items()))
        path = out / f"{self.name}_{stem}.py"
        path.write_text(f"# fake kernel {self.config}\n")
        return path

    def compile_sm90(self):
        return {"k": {"n_regs": 32, "shared": 1024, "_asm": {"cubin": b"\0"}}}

    def __call__(self, q, k, v, block_indices, block_counts, seq_lens, block_table=None,
                 sm_scale=None, num_splits=None):
        from sparsegen.methods.sparse_decode_ref import sparse_decode_reference

        return sparse_decode_reference(q, k, v, block_indices, block_counts, seq_lens,
                                       self.static.block_size, block_table=block_table,
                                       sm_scale=sm_scale).to(q.dtype)


class FakeDecode2(FakeDecode):
    name = "fake2"

    @classmethod
    def tunable_space(cls, static):
        return {"chunk": [8, 16, 32]}

    @classmethod
    def default_config(cls, static):
        return {"chunk": 16}

    @classmethod
    def check_config(cls, static, config):
        return None


@dataclass(frozen=True)
class FakeRuleStatic:
    block_size: int
    rows: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


class FakeRuleNoBench:
    """A rule kernel adapter without the tuner's GPU protocol (like the gate step)."""

    name = "fake_rule"
    template = FAKE_TEMPLATE

    def __init__(self, static, config=None, build_dir=None):
        self.static = static
        self.config = dict(self.default_config(static) if config is None else config)
        reason = self.check_config(static, self.config)
        if reason:
            raise ValueError(reason)
        self.build_dir = build_dir

    @classmethod
    def tunable_space(cls, static):
        return {"block": [16, 32, 64, 128], "num_warps": [1, 2, 4]}

    @classmethod
    def default_config(cls, static):
        return {"block": 32, "num_warps": 2}

    @classmethod
    def check_config(cls, static, config):
        if config["block"] * config["num_warps"] > 256:
            return f"block*num_warps={config['block'] * config['num_warps']} exceeds registers"
        return None

    def render(self):
        return FakeDecode.render(self)

    def compile_sm90(self, keep_asm=False):
        return {"k": {"n_regs": 24, "shared": 0}}


class FakeRule(FakeRuleNoBench):
    @classmethod
    def bench_inputs(cls, static, batch, seq_len, heads=8, budget_blocks=64, device="cuda",
                     seed=0):
        return {"scores": [[seed] * heads] * batch, "k": budget_blocks}

    def reference(self, scores, k):
        return scores

    def __call__(self, scores, k):
        return scores


class FakeRuleSeeded(FakeRule):
    """Names seeds: two feasible, one statically infeasible, one outside the space."""

    @classmethod
    def seed_configs(cls, static):
        return [{"block": 128, "num_warps": 1}, {"block": 128, "num_warps": 4},
                {"block": 16, "num_warps": 4}, {"block": 48, "num_warps": 1}]


MODULE = "tests.tune_fakes"  # by name, not __name__ (which is __main__ in a script)
_backend._ADAPTERS.setdefault("fake", (MODULE, "FakeDecode"))
_backend._ADAPTERS.setdefault("fake2", (MODULE, "FakeDecode2"))


def fake_kernel(name="fake_decode", backends=("fake", "fake2"), shapes=((1, 1024), (4, 4096))):
    return KernelPlan(name=name, static=DecodeStatic(64, 64, 4, "fp32"), num_q_heads=8,
                      num_kv_heads=2, backends=tuple(backends),
                      shapes=tuple(ShapeBucket(b, s) for b, s in shapes),
                      selected_fraction=0.25)


class FakePlan:
    def __init__(self, *kernels, rule_kernels=()):
        self.kernels = kernels
        self.rule_kernels = tuple(rule_kernels)


def cost(backend: str, config: dict) -> float:
    """The fake objective: best at fake tile=64 warps=4 stages=1."""
    if backend == "fake2":
        return 2.0 + config["chunk"] / 100
    if "block" in config:  # FakeRule: best at block=64 num_warps=4
        return 0.5 + 0.1 * abs(math.log2(config["block"] / 64)) + 0.05 * abs(
            config["num_warps"] - 4)
    return (1.0 + 0.3 * abs(math.log2(config["tile"] / 64)) + 0.1 * abs(config["warps"] - 4)
            + 0.05 * config["stages"])


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the worker classifies as 'oom'."""


def _log(event: str, task: dict | None = None) -> None:
    path = os.environ.get("FAKE_LOG")
    if not path:
        return
    rec = {"event": event, "pid": os.getpid()}
    if task:
        rec.update(study=task["study"], trial=task["trial"], backend=task["backend"],
                   config=task["config"])
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


def prepare(workload: dict) -> dict:
    _log("prepare")
    return {"sets": 1}


def compile(task: dict) -> dict:  # noqa: A001 - the target's name
    if os.environ.get("FAKE_FAILURES") and task["config"] == {"tile": 32, "warps": 1, "stages": 1}:
        raise CompileError("ptxas: fake compile error")
    return {"k": {"n_regs": 40}}


def evaluate(task: dict) -> dict:
    cfg, backend = task["config"], task["backend"]
    _log("evaluate", task)
    kill_after = int(os.environ.get("FAKE_KILL_PARENT_AFTER", "0"))
    if kill_after:
        done = sum(1 for ln in open(os.environ["FAKE_LOG"]) if '"evaluate"' in ln)
        if done >= kill_after:
            os.kill(os.getppid(), signal.SIGKILL)  # the tuner dies mid-trial
            time.sleep(30)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    if os.environ.get("FAKE_FAILURES") and "tile" in cfg:
        t, w = cfg["tile"], cfg["warps"]
        if (t, w) == (128, 1):
            os.kill(os.getpid(), signal.SIGSEGV)
        if (t, w) == (16, 8):
            time.sleep(3600)
        if (t, w) == (16, 1):
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        if (t, w) == (64, 8):
            raise CandidateError("full-size check: max relative error 0.5 >= 0.01", kind="wrong")
    ms = cost(backend, cfg)
    return {"median_ms": ms, "plain_ms": ms * 1.5, "graph_ms": ms, "bandwidth_gbs": 100 / ms,
            "max_rel_err": 1e-3}


TARGETS = dict(prepare=f"{MODULE}:prepare", evaluate=f"{MODULE}:evaluate",
               compile=f"{MODULE}:compile")


def main(argv=None) -> int:
    """One tuning worker over fake_plan(); writes the results as JSON."""
    from sparsegen.tune.db import GpuId, TuningDB
    from sparsegen.tune.tuner import Targets, TuneOptions, tune_plan

    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--storage", default=None)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kernel-name", default="fake_decode")
    p.add_argument("--result", default=None)
    args = p.parse_args(argv)
    opts = TuneOptions(gpu=GpuId("Fake GPU", "9.0"), db=TuningDB(args.db), trials=args.trials,
                       timeout_s=5.0, workers=args.workers, storage=args.storage,
                       cache_dir=Path(args.cache), targets=Targets(**TARGETS))
    results = tune_plan(FakePlan(fake_kernel(args.kernel_name)), opts)
    out = [{"shape": r.shape, "status": r.status, "message": r.message,
            "best": r.entry and r.entry["best"], "study": r.entry and r.entry["study"]}
           for r in results]
    if args.result:
        Path(args.result).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":  # python -m tests.tune_fakes (from the repository root)
    from tests import tune_fakes  # run under its importable name, as the children see it

    sys.exit(tune_fakes.main())
