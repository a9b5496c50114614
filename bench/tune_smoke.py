"""Device check of the tuning pipeline (`sparsegen tune` / `sparsegen build`) on a GPU.

  source .gpu/prelude.sh && python3 bench/tune_smoke.py [--backends triton,tilelang]
      [--trials N] [--batch 1,16] [--seq-len 32768] [--workers N]

1. sparsegen.tune.bench: prepare + evaluate each backend's default config on the first
   shape (correctness gate on the ragged and full-size cases, plain and CUDA-graph times);
2. `sparsegen tune` of a small SeerAttention-R-shaped spec (Hq 32, Hkv 8, D 128, block 64,
   bf16, 4096-token budget) into $OUT/tuning_db, timed, with -o $OUT/pkg;
3. the same `tune` again on the warm database: no GPU work, timed (must be < 5 s);
4. the emitted package on the GPU: the config it picks, and its output vs the reference.
Writes $OUT/tune_smoke.json (bench/results/ when OUT is unset).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = """
name: tune_smoke
model: {{num_q_heads: 32, num_kv_heads: 8, head_dim: 128, dtype: bf16}}
selection: {{rule: topk, block_size: 64, sink_blocks: 0, local_blocks: 1, budget_tokens: 4096}}
backends: [{backends}]
tuning: {{batch: [{batch}], seq_len: [{seq_len}], trials: {trials}, timeout_s: 120}}
"""


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="triton,tilelang")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--batch", default="1,16")
    p.add_argument("--seq-len", default="32768")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--skip-direct", action="store_true")
    args = p.parse_args()
    from bench.timing import require_cuda

    require_cuda()
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"args": vars(args)}
    spec_path = out / "tune_smoke.yaml"
    spec_path.write_text(SPEC.format(backends=", ".join(args.backends.split(",")),
                                     batch=", ".join(args.batch.split(",")),
                                     seq_len=", ".join(args.seq_len.split(",")),
                                     trials=args.trials))
    import torch

    from sparsegen.plan import make_plan
    from sparsegen.spec import load_spec
    from sparsegen.tune import bench
    from sparsegen.tune.space import SearchSpace

    res["device"] = torch.cuda.get_device_name(0)
    plan = make_plan(load_spec(spec_path))
    kernel = plan.kernels[0]

    # 1. direct evaluation of the defaults
    if not args.skip_direct:
        workload = bench.Workload.of(kernel, kernel.shapes[0]).as_dict()
        t0 = time.time()
        res["prepare"] = bench.prepare(workload)
        res["prepare_s"] = time.time() - t0
        res["direct"] = []
        space = SearchSpace(kernel)
        for cand in space.defaults():
            cls = space.adapters[cand.backend]
            task = {"adapter": f"{cls.__module__}:{cls.__qualname__}",
                    "static": kernel.static.as_dict(), "config": cand.config,
                    "build_dir": None, "workload": workload, "tolerance": 1e-2}
            t0 = time.time()
            try:
                r = bench.evaluate(task)
                r["ok"] = True
            except Exception as e:  # noqa: BLE001 - report and go on
                r = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
            r.update(backend=cand.backend, config=cand.config, wall_s=time.time() - t0)
            res["direct"].append(r)
            print("direct", json.dumps(r, default=str), flush=True)
        bench._STATE.clear()
        torch.cuda.empty_cache()

    # 2. tune, 3. warm tune
    env = {**os.environ, "SPARSEGEN_CACHE_DIR": str(out / "cache")}
    cmd = [sys.executable, "-m", "sparsegen.cli", "tune", str(spec_path), "--db",
           str(out / "tuning_db"), "--workers", str(args.workers), "-o", str(out / "pkg")]
    for label in ("cold", "warm"):
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        res[f"tune_{label}"] = {"rc": r.returncode, "wall_s": time.time() - t0,
                                "stdout": r.stdout[-4000:], "stderr": r.stderr[-6000:]}
        print(f"tune {label}: rc {r.returncode} in {time.time() - t0:.1f} s\n{r.stdout}"
              f"{r.stderr[-3000:]}", flush=True)

    # 4. the emitted package on the GPU
    try:
        sys.path.insert(0, str(out / "pkg"))
        import tune_smoke as pkg

        from sparsegen.methods.sparse_decode_ref import sparse_decode_reference
        from sparsegen.tune.db import _gpu_from_driver, torch_gpu

        slug = torch_gpu().slug
        attn = pkg.SparseDecodeAttention()
        shape = kernel.shapes[-1]
        w = bench.Workload.of(kernel, shape)
        gen = torch.Generator(device="cuda").manual_seed(5)
        inputs = bench._uniform_inputs(torch, w, gen, torch.device("cuda"))
        outm = attn(inputs["q"], inputs["k"], inputs["v"], inputs["block_indices"],
                    inputs["block_counts"], inputs["seq_lens"])
        ref = sparse_decode_reference(inputs["q"], inputs["k"], inputs["v"],
                                      inputs["block_indices"], inputs["block_counts"],
                                      inputs["seq_lens"], 64)
        res["module"] = {"pick": pkg.pick_config(slug, shape.batch, shape.seq_len),
                         "rel_err": bench.relative_error(outm, ref),
                         "gpu_torch": slug, "gpu_driver": _gpu_from_driver().slug}
        print("module", res["module"], flush=True)
    except Exception as e:  # noqa: BLE001
        res["module"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print("module error", res["module"], flush=True)
    (out / "tune_smoke.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
