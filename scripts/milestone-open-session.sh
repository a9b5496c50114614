#!/usr/bin/env bash
# On an H100, Session 27's one device call (under 10 minutes; stages under shares of one
# deadline) for the milestone rule's page openings on the device:
#   1. tests/test_milestone_gpu.py: steps that open pages and evict, captured in a CUDA graph
#      and replayed on fresh inputs, bit for bit against eager twins;
#   2. the milestone bench (`--parts milestone`): memory over a 32K decode, the step at 64K,
#      and the step as a model runs it (one graph of 16 whole steps, replayed);
#   3. the emitted layer of every example spec (milestone included) replayed from a graph and
#      against its torch selection, then the entmax summary append on hardware
#      (tests/test_entmax_graph_gpu.py, its first GPU run); each test file in its own process.
# Writes OUTDIR/milestone-open-gpu-tests.txt and OUTDIR/milestone-open-step.{md,json} (each
# names its GPU; committed under bench/results/ with the GPU's name in front).
#   bash scripts/milestone-open-session.sh OUTDIR
set -uo pipefail
out=${1:?usage: scripts/milestone-open-session.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
source scripts/lib/deadline.sh 570
log="$out/milestone-open-gpu-tests.txt"
{ echo "# $(date -u '+%F %T') UTC, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$log"
run_tests() {  # FILE [PYTEST-ARGS...]: one test file in its own process, logged
  echo "== python -m pytest -v $*" >> "$log"
  timeout "$(cap 140)" python -m pytest -v "$@" >> "$log" 2>&1
  echo "   rc $?" >> "$log"
}
run_tests tests/test_milestone_gpu.py
timeout "$(cap 300)" python bench/methods_entmax_milestone.py --parts milestone \
  --out "$out/milestone-open-step" 2>&1 | tail -n 4
echo "bench rc $?"
run_tests tests/test_emitted_layer_gpu.py -k "graph or selection"
run_tests tests/test_entmax_graph_gpu.py
grep -E "passed|failed|rc " "$log"
