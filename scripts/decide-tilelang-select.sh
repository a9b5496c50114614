#!/usr/bin/env bash
# On an H100, decide branch tilelang-select in one device call (< 10 min):
#   1. the TileLang top-k's GPU tests (bit for bit against the torch selection);
#   2. bench/block_select_tilelang_probe.py: TileLang vs the tuned Triton block_select, same run;
#   3. re-tune block_select for every example spec that has one (its entries are stale on this
#      branch: each study measures the previous winner, the default and the two TileLang
#      seeds), packing tuning_db/ into $OUT after each spec;
#   4. the decode-step bench of the gate / Quest b64 / NSA rules at the new winners.
#   scripts/decide-tilelang-select.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/decide-tilelang-select.sh OUTDIR}
mkdir -p "$out"
python -m pytest -q -x -p no:cacheprovider tests/test_select_tilelang_gpu.py > "$out/gpu-tests.txt" 2>&1 \
  || { tail -30 "$out/gpu-tests.txt"; echo "GPU tests failed: stopping"; exit 1; }
tail -1 "$out/gpu-tests.txt"
timeout 120 python bench/block_select_tilelang_probe.py --out "$out/H100-block-select-tilelang" > "$out/probe.txt" 2>&1
SAVE_DB="$out/tuning_db.tgz" SPECS="seer-attention-r nsa-topk quest-topk" \
  timeout 260 scripts/tune-examples.sh 250 "$out/tune-logs" --trials 4 --workers 8 --kernels block_select
timeout 200 python bench/methods_gate_topk.py --rules gate quest-ub-per-head-b64 nsa-mean-shared-b64 \
  --out "$out/H100-step-gate-topk" > "$out/step.txt" 2>&1
tail -25 "$out/step.txt"
