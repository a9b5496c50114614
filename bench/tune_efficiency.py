"""How fast does `sparsegen tune` (Optuna) get close to the best config? Issue target: within
3 % of the exhaustive best in at most 25 % of the trials (median over 5 seeds).

  python bench/tune_efficiency.py            # GPU sweep, then the replay: ~2.5 min on an H100
  python bench/tune_efficiency.py --replay bench/results/H100-tune-sweep.json  # CPU only
(on the device machine: `source .gpu/prelude.sh && python3 bench/tune_efficiency.py`)

1. Sweep (GPU, once). The sparse decode kernel (Hq 32, Hkv 8, D 128, block 64, bf16,
   contiguous, 10 % of blocks selected) at three shapes, over a sub-space of the Triton
   backend's tunable space: SWEPT below, the other knobs (merge_chunk, merge_warps, pdl) fixed
   at the heuristic default. Configs the adapter's check_config rejects are dropped (the tuner
   prunes them on the CPU for free). Each distinct kernel build is compiled once, in parallel,
   by the tuner's compile workers (the Triton cache warms); then every config is gated and
   timed one at a time by the tuner's own GPU evaluation (sparsegen.tune.bench: correctness
   gate, then the CUDA-graph median that `tune` minimizes) in the tuner's GPU child process,
   so a crash or hang is a failed entry as in `tune`. waves and min_blocks_per_split only set
   the runtime split count: configs that launch the same kernels with the same split count on
   a shape share one measurement (`same_as`). Table: bench/results/<GPU>-tune-sweep.json.
2. Replay (CPU). Per shape and seed, the tuner's own study (tuner._ShapeStudy: its TPE sampler
   settings, heuristic default enqueued first, infeasible draws pruned, repeats reused, failed
   candidates failed, budget = every feasible config) with the GPU evaluation replaced by a
   lookup in the table. A trial is an evaluated candidate (measured or failed: what costs GPU
   time in `tune`). Trials run one at a time (`tune` keeps --workers in flight, constant liar);
   a study stops once it has found the exhaustive best (best-so-far cannot improve after it).
   For context, the same without the default enqueued (the sampler alone) and random search.
   Writes <GPU>-tune-efficiency.md (tables and verdict) and .png (best-so-far / exhaustive
   best vs trials: median and min-max over seeds, one panel per shape); copies go to $OUT if set.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from bench.timing import require_cuda  # noqa: E402
from sparsegen.codegen.decode_api import DecodeStatic  # noqa: E402
from sparsegen.plan import KernelPlan, ShapeBucket  # noqa: E402
from sparsegen.tune.space import Candidate, SearchSpace  # noqa: E402
from sparsegen.tune.tuner import CandidateFailed, Targets, TuneOptions, _ShapeStudy  # noqa: E402

KERNEL = {"static": {"block_size": 64, "head_dim": 128, "group_size": 4, "dtype": "bf16",
                     "layout": "contiguous", "page_size": 0},
          "num_q_heads": 32, "num_kv_heads": 8, "selected_fraction": 0.10,
          "shapes": [[1, 32768], [8, 32768], [16, 131072]], "backend": "triton"}
SWEPT = {"block_n": [32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [2, 3, 4, 5],
         "waves": [1, 2, 4, 8], "min_blocks_per_split": [1, 2, 4]}
RUNTIME_KNOBS = ("waves", "min_blocks_per_split")  # set the split count; same kernel build
WITHIN, TARGET, SEEDS = 0.03, 0.25, 5
EVAL_TIMEOUT_S, COMPILE_TIMEOUT_S, PREPARE_TIMEOUT_S = 60.0, 300.0, 600.0
CURVE_AT = (1, 2, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200)


# ---------------------------------------------------------------------------------------
# Kernel and sub-space (shared by sweep and replay)
# ---------------------------------------------------------------------------------------
def make_kernel(meta: dict) -> KernelPlan:
    return KernelPlan(name="sparse_decode", static=DecodeStatic(**meta["static"]),
                      num_q_heads=meta["num_q_heads"], num_kv_heads=meta["num_kv_heads"],
                      backends=(meta["backend"],),
                      shapes=tuple(ShapeBucket(b, s) for b, s in meta["shapes"]),
                      selected_fraction=meta["selected_fraction"])


def make_space(kernel: KernelPlan, choices: dict | None = None) -> SearchSpace:
    """The tuner's SearchSpace of the kernel, restricted to `choices` (default: SWEPT, the
    other knobs fixed at the backend's heuristic default)."""
    space = SearchSpace(kernel)
    backend = kernel.backends[0]
    full = space.choices[backend]
    if choices is None:
        default = space.adapters[backend].default_config(kernel.static)
        choices = {k: SWEPT.get(k, [default[k]]) for k in full}
    bad = {k: v for k, v in choices.items() if k not in full or not set(v) <= set(full[k])}
    if bad or set(choices) != set(full):
        raise ValueError(f"sub-space {choices} is not inside the tuner's space {full}")
    space.choices[backend] = {k: list(v) for k, v in choices.items()}
    return space


def feasible(space: SearchSpace) -> tuple[list[Candidate], int]:
    """Feasible candidates of the (one-backend) space, and the size of the whole space."""
    (backend, choices), = space.choices.items()
    allc = [Candidate(backend, dict(zip(choices, vals)))
            for vals in itertools.product(*choices.values())]
    return [c for c in allc if space.infeasibility(c) is None], len(allc)


# ---------------------------------------------------------------------------------------
# 1. Sweep (GPU)
# ---------------------------------------------------------------------------------------
def sweep(out_dir: Path, workers: int) -> Path:
    import torch

    from bench.timing import gpu_facts
    from sparsegen.codegen.triton_decode import split_count
    from sparsegen.tune.bench import Workload
    from sparsegen.tune.worker import ChildWorker, WorkerPool

    t_start = time.time()
    facts = gpu_facts()
    kernel = make_kernel(KERNEL)
    space = make_space(kernel)
    cands, size = feasible(space)
    cls = space.adapters[KERNEL["backend"]]
    targets = Targets()
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "sparsegen-tune-efficiency"

    def task(cand, workload=None):
        return {"adapter": f"{cls.__module__}:{cls.__qualname__}",
                "static": kernel.static.as_dict(), "config": cand.config,
                "backend": cand.backend, "build_dir": None, "workload": workload,
                "tolerance": 1e-2}

    def build_key(cand):
        return json.dumps({k: v for k, v in cand.config.items() if k not in RUNTIME_KNOBS},
                          sort_keys=True)

    builds = {build_key(c): c for c in cands}
    print(f"{facts['gpu']}: {size} configs in the sub-space, {len(cands)} feasible, "
          f"{len(builds)} kernel builds; compiling on {workers} CPU workers", flush=True)
    pool = WorkerPool(workers, "compile", log_dir)

    def compile_one(cand):
        with pool.worker() as w:
            return w.call(targets.compile, task(cand), COMPILE_TIMEOUT_S)

    t0 = time.time()
    try:
        with ThreadPoolExecutor(workers) as ex:
            compiled = dict(zip(builds, ex.map(compile_one, builds.values())))
    finally:
        pool.close()
    compile_s = time.time() - t0
    print(f"compiled in {compile_s:.0f} s, {sum(not o.ok for o in compiled.values())} failed",
          flush=True)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gpu = ChildWorker("gpu", log_dir)
    shapes = []
    try:
        for shape in kernel.shapes:
            t0 = time.time()
            workload = Workload.of(kernel, shape).as_dict()
            rows, launches, inputs = [], {}, None
            for i, cand in enumerate(cands):
                c = cand.config
                splits = split_count(shape.batch, kernel.num_kv_heads,
                                     workload["selected_blocks"], sms, c["waves"],
                                     c["min_blocks_per_split"])
                launch = (build_key(cand), splits)
                if launch in launches:  # the same kernels and grid: the same measurement
                    j = launches[launch]
                    rows.append({**rows[j], "config": c, "same_as": j})
                    continue
                launches[launch] = i
                out = compiled[build_key(cand)]
                if out.ok:
                    if not gpu.alive or gpu.state.get("workload") != workload:
                        prep = gpu.call(targets.prepare, workload, PREPARE_TIMEOUT_S)
                        if not prep.ok:
                            raise SystemExit(f"cannot prepare {shape.key}: {prep.reason}")
                        gpu.state["workload"], inputs = workload, prep.value
                    out = gpu.call(targets.evaluate, task(cand, workload), EVAL_TIMEOUT_S)
                row = {"config": c, "num_splits": splits}
                row.update({"ok": True, **out.value} if out.ok else
                           {"ok": False, "kind": out.kind, "reason": out.reason[:300]})
                rows.append(row)
                if len(launches) % 50 == 0:
                    print(f"  {shape.key}: {len(launches)} launches timed", flush=True)
            ok = [r for r in rows if r["ok"]]
            best = min(ok, key=lambda r: r["median_ms"]) if ok else None
            shapes.append({"batch": shape.batch, "seq_len": shape.seq_len, "key": shape.key,
                           "selected_blocks": workload["selected_blocks"], "inputs": inputs,
                           "measured_launches": len(launches), "wall_s": time.time() - t0,
                           "rows": rows})
            print(f"{shape.key}: {len(launches)} launches timed in {time.time() - t0:.0f} s, "
                  f"{len(rows) - len(ok)} of {len(rows)} configs failed; best "
                  f"{best['median_ms'] if best else math.nan:.4g} ms", flush=True)
    finally:
        gpu.close()
    doc = {"gpu": facts, "kernel": KERNEL, "space": space.choices[KERNEL["backend"]],
           "space_size": size, "feasible": len(cands), "objective": "sparsegen.tune.bench."
           "evaluate median_ms (CUDA-graph median per call, after the correctness gate)",
           "compile_s": compile_s, "sweep_s": time.time() - t_start, "shapes": shapes}
    path = out_dir / f"{facts['gpu_slug']}-tune-sweep.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}", flush=True)
    return path


# ---------------------------------------------------------------------------------------
# 2. Replay (CPU)
# ---------------------------------------------------------------------------------------
class ReplayStudy(_ShapeStudy):
    """The tuner's study of one shape, its GPU evaluation replaced by a table lookup."""

    def __init__(self, kernel, shape, space, table: dict, seed: int, budget: int, best: float):
        opts = TuneOptions(gpu=None, db=None, trials=budget, seed=seed, workers=1,
                           stream=io.StringIO())
        session = SimpleNamespace(opts=opts, storage=optuna.storages.InMemoryStorage())
        super().__init__(session, kernel, {}, shape, space, f"replay-{shape.key}-{seed}")
        self.table, self.best, self.values = table, best, []

    def _evaluate(self, trial, cand: Candidate) -> float:
        row = self.table.get(cand.key)
        if row is None:
            raise RuntimeError(f"{cand.describe()} is feasible here but not in the sweep table "
                               "(check_config changed since the sweep?)")
        self.values.append(row["median_ms"] if row["ok"] else None)
        if not row["ok"]:
            self._fail(trial, row["kind"], row["reason"])
        trial.set_user_attr("outcome", "measured")
        if row["median_ms"] <= self.best:
            self.study.stop()  # the exhaustive best: best-so-far cannot improve any more
        return row["median_ms"]

    def search(self, with_default: bool = True) -> list:
        """Evaluated candidates' times in trial order (None: failed), as `tune` runs them
        (with_default=False: the sampler alone, no heuristic default enqueued first)."""
        for cand in self.space.defaults() if with_default else ():
            self.study.enqueue_trial(self.space.params(cand), user_attrs={"default": True})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.study.optimize(self._objective, catch=(CandidateFailed,),
                                callbacks=[self._stop_when_done])
        return self.values


def replay_one(doc: dict, index: int, seed: int, with_default: bool) -> list:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    kernel = make_kernel(doc["kernel"])
    space = make_space(kernel, doc["space"])
    cands, _ = feasible(space)
    sh = doc["shapes"][index]
    table = {Candidate(doc["kernel"]["backend"], r["config"]).key: r for r in sh["rows"]}
    best = min(r["median_ms"] for r in sh["rows"] if r["ok"])
    study = ReplayStudy(kernel, ShapeBucket(sh["batch"], sh["seq_len"]), space, table, seed,
                        len(cands), best)
    return study.search(with_default)


def best_so_far(values: list, best: float, n: int) -> list[float]:
    """Best-so-far / exhaustive best after each of n trials (flat after the study stopped)."""
    out, cur = [], math.inf
    for v in values[:n]:
        cur = min(cur, v if v is not None else math.inf)
        out.append(cur / best)
    return out + [out[-1] if out else math.inf] * (n - len(out))


def first_within(curve: list[float], ratio: float) -> int | None:
    return next((i + 1 for i, r in enumerate(curve) if r <= ratio * (1 + 1e-12)), None)


def _fmt_n(n) -> str:
    return "never" if n is None or n == math.inf else f"{n:g}"


def _median(xs: list) -> float:
    return statistics.median(math.inf if x is None else x for x in xs)


def replay(path: Path, out_dir: Path, seeds: int) -> tuple[Path, Path]:
    doc = json.loads(Path(path).read_text())
    kernel = make_kernel(doc["kernel"])
    space = make_space(kernel, doc["space"])
    cands, size = feasible(space)
    n = len(cands)
    jobs = [(doc, i, s, d) for i in range(len(doc["shapes"])) for s in range(seeds)
            for d in (True, False)]
    t0 = time.time()
    with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1),
                             mp_context=multiprocessing.get_context("spawn")) as ex:
        runs = dict(zip([j[1:] for j in jobs], ex.map(replay_one, *zip(*jobs))))
    print(f"replayed {len(jobs)} studies in {time.time() - t0:.0f} s", flush=True)

    default = space.defaults()[0]
    results = []
    for i, sh in enumerate(doc["shapes"]):
        rows = {Candidate(default.backend, r["config"]).key: r for r in sh["rows"]}
        ok = [r for r in sh["rows"] if r["ok"]]
        best = min(ok, key=lambda r: r["median_ms"])
        curves = [best_so_far(runs[i, s, True], best["median_ms"], n) for s in range(seeds)]
        alone = [best_so_far(runs[i, s, False], best["median_ms"], n) for s in range(seeds)]
        to_within = [first_within(c, 1 + WITHIN) for c in curves]
        good = sum(r["ok"] and r["median_ms"] <= (1 + WITHIN) * best["median_ms"]
                   for r in sh["rows"])
        med = _median(to_within)
        results.append({"key": sh["key"], "best": best, "default": rows.get(default.key),
                        "failed": len(sh["rows"]) - len(ok), "curves": curves,
                        "to_within": to_within, "median": med,
                        "to_best": [first_within(c, 1.0) for c in curves],
                        "alone": _median([first_within(c, 1 + WITHIN) for c in alone]),
                        "alone_curves": alone,
                        "good": good, "random": (n + 1) / (good + 1), "pass": med <= TARGET * n})
    md = _report(doc, results, n, size, seeds)
    png = _plot(doc, results, n)
    stem = f"{doc['gpu']['gpu_slug']}-tune-efficiency"
    md_path, png_path = out_dir / f"{stem}.md", out_dir / f"{stem}.png"
    md_path.write_text(md)
    png.savefig(png_path, dpi=120, bbox_inches="tight")
    print(md, flush=True)
    print(f"wrote {md_path} and {png_path}", flush=True)
    return md_path, png_path


def _cfg(config: dict, fixed: set) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items() if k not in fixed)


def _report(doc: dict, results: list, n: int, size: int, seeds: int) -> str:
    g, k = doc["gpu"], doc["kernel"]
    fixed = {name for name, vals in doc["space"].items() if len(vals) == 1}
    swept = " × ".join(f"{name} {{{', '.join(map(str, vals))}}}"
                       for name, vals in doc["space"].items() if name not in fixed)
    fixed_txt = ", ".join(f"{name}={doc['space'][name][0]}" for name in sorted(fixed))
    s = k["static"]
    lines = [
        f"# Tuner efficiency: Optuna vs exhaustive sweep ({g['gpu_slug']})", "",
        f"{g['gpu']} ({g['sms']} SMs), {g['date']}; {g['versions']}.", "",
        f"Kernel: sparse decode, Hq {k['num_q_heads']} / Hkv {k['num_kv_heads']} / D "
        f"{s['head_dim']} / block {s['block_size']} / {s['dtype']} / {s['layout']}, "
        f"{k['selected_fraction']:.0%} of blocks selected; backend {k['backend']}.",
        f"Sub-space of the tuner's space: {swept} ({fixed_txt} fixed at the default): "
        f"{size} configs, **{n} feasible** (check_config). Objective: `tune`'s "
        "(sparsegen.tune.bench: correctness gate, then CUDA-graph median ms).",
        f"Replay: the tuner's study (TPE sampler as in `tune`, heuristic default enqueued "
        f"first, infeasible draws pruned for free) over the measured table, {seeds} seeds, "
        f"budget {n}; a trial is an evaluated candidate (measured or failed), run one at a time.",
        "", f"Target: median over seeds of the trials needed to reach within {WITHIN:.0%} of "
        f"the exhaustive best ≤ {TARGET:.0%} of the {n} feasible configs "
        f"(≤ {TARGET * n:.0f} trials).", "",
        "| shape | exhaustive best (ms) | best config | default (ms, × best) | failed | "
        f"trials to ≤ {WITHIN:.0%} (per seed) | median | median / {n} | ≤ {TARGET:.0%}? |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, d = r["best"], r["default"]
        dtxt = (f"{d['median_ms']:.4f} ({d['median_ms'] / b['median_ms']:.2f}×)"
                if d and d["ok"] else "failed")
        lines.append(
            f"| {r['key']} | {b['median_ms']:.4f} | {_cfg(b['config'], fixed)} | {dtxt} | "
            f"{r['failed']} | {', '.join(map(_fmt_n, r['to_within']))} | "
            f"{_fmt_n(r['median'])} | {r['median'] / n:.1%} | "
            f"{'yes' if r['pass'] else '**no**'} |")
    worst = max(r["median"] for r in results)
    verdict = "PASS" if all(r["pass"] for r in results) else "FAIL"
    lines += [
        "", f"**Verdict: {verdict}** — worst shape's median trials to within {WITHIN:.0%} of "
        f"the exhaustive best: {_fmt_n(worst)} of {n} ({worst / n:.1%}; target ≤ "
        f"{TARGET:.0%}).", "",
        "Context (medians over seeds): how many configs are within reach, what random search "
        "would need, the sampler without the default enqueued, and trials to the exact best.", "",
        f"| shape | configs ≤ {WITHIN:.0%} of best | random search, expected trials to "
        f"≤ {WITHIN:.0%} | sampler alone, trials to ≤ {WITHIN:.0%} | "
        "tune, trials to the best |",
        "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['key']} | {r['good']} of {n} | {r['random']:.1f} | "
                     f"{_fmt_n(r['alone'])} | {_fmt_n(_median(r['to_best']))} |")
    lines += ["", f"## Best-so-far / exhaustive best vs trials (median [min–max] over {seeds} "
              "seeds)", "",
              "| trials | " + " | ".join(r["key"] for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for t in sorted({t for t in CURVE_AT if t < n} | {round(TARGET * n), n}):
        cells = []
        for r in results:
            col = [c[t - 1] for c in r["curves"]]
            cells.append(f"{statistics.median(col):.3f} [{min(col):.3f}–{max(col):.3f}]")
        lines.append(f"| {t} ({t / n:.0%}) | " + " | ".join(cells) + " |")
    lines += ["", f"Sweep: {doc['sweep_s']:.0f} s on the GPU (compile {doc['compile_s']:.0f} s), "
              + ", ".join(f"{sh['key']} {sh['measured_launches']} distinct launches timed"
                          for sh in doc["shapes"]) + "; configs that launch the same kernels "
              "with the same split count share one measurement.", ""]
    return "\n".join(lines)


def _plot(doc: dict, results: list, n: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True)
    x = list(range(1, n + 1))
    for ax, r in zip(list(axes), results):
        cols = list(zip(*r["curves"]))
        ax.fill_between(x, [min(c) for c in cols], [max(c) for c in cols], alpha=0.25,
                        step="post", label="min–max over seeds")
        ax.step(x, [statistics.median(c) for c in cols], where="post", lw=2,
                label="median (tune: default first)")
        ax.step(x, [statistics.median(c) for c in zip(*r["alone_curves"])], where="post",
                lw=1, color="gray", label="median, sampler alone")
        ax.axhline(1 + WITHIN, color="k", ls="--", lw=1, label=f"best + {WITHIN:.0%}")
        ax.axvline(TARGET * n, color="r", ls=":", lw=1, label=f"{TARGET:.0%} of {n}")
        ax.set_xscale("log")
        ax.set_title(f"{r['key']}: best {r['best']['median_ms'] * 1e3:.1f} µs")
        ax.set_xlabel("trials (evaluated candidates)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best-so-far / exhaustive best")
    top = max(max(c[0] for c in r["curves"]) for r in results)
    axes[0].set_ylim(0.99, min(max(1 + 3 * WITHIN, top * 1.02), 3.0))
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"Optuna (tune's sampler) vs exhaustive sweep, {doc['gpu']['gpu']}")
    return fig


# ---------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replay", type=Path, help="replay a saved sweep table only (no GPU)")
    p.add_argument("--seeds", type=int, default=SEEDS)
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="CPU compile workers of the sweep")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    if not args.replay:
        require_cuda("--replay TABLE runs without one")
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.replay or sweep(args.out, args.workers)
    _publish(table)  # before the replay: the GPU's part is safe even if the replay fails
    for path in replay(table, args.out, args.seeds):
        _publish(path)
    return 0


def _publish(path: Path) -> None:
    """A copy in $OUT when that is set (the device tool returns the files under it)."""
    dest = Path(os.environ.get("OUT") or path.parent) / path.name
    if dest.resolve() != path.resolve():
        shutil.copy(path, dest)


if __name__ == "__main__":
    sys.exit(main())
