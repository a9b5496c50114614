#!/usr/bin/env bash
# On an H100, decide the branch fused-append (the topk rule's KV append and metadata fold in
# one launch) in one device call of under 10 minutes:
#   1. tests/test_kv_append_gpu.py (the kernel path against the torch path bit for bit, bf16
#      included, and in a CUDA graph) and the emitted layers of the topk and milestone
#      example specs on the GPU (tests/test_emitted_layer_gpu.py), each in its own process
#      (a test module that sets TRITON_INTERPRET would turn the kernels of the GPU tests
#      into interpreted ones);
#   2. the topk decode step at 32K and 128K, B 8 and 16, NSA (mean_pooled, shared, block 64)
#      and Quest block 64 (upper_bound, per_head), side by side: OLDTREE (main: kv_append
#      then quest_meta_append, two launches) and this tree (one launch), each at its own
#      tuning_db/ (this tree's quest_meta / quest_score entries were re-tuned for the new
#      kernel by the first version of this script, H100-tune-fused-append.log).
# Every stage runs whatever the one before did (each logs its exit status), under a share of
# one deadline (TOTAL seconds, default 570).
#   bash scripts/fused-append-session.sh OUTDIR OLDTREE
# OLDTREE: main's code (`git archive main sparsegen templates bench tuning_db examples
# pyproject.toml | tar -x -C OLDTREE`).
set -uo pipefail
usage="usage: scripts/fused-append-session.sh OUTDIR OLDTREE"
out=${1:?$usage}; old=${2:?$usage}
mkdir -p "$out" && out=$(cd "$out" && pwd)
old=$(cd "$old" 2>/dev/null && pwd) || { echo "OLDTREE $2 is not a directory; $usage" >&2; exit 2; }
[[ -f "$old/bench/methods_gate_topk.py" ]] || { echo "OLDTREE $old has no bench/; $usage" >&2; exit 2; }
cd "$(dirname "$0")/.."
source scripts/lib/deadline.sh 570
within() {  # SECONDS CMD...: CMD under that timeout; not run with under 10 s (timeout 0 = none)
  local s=$1; shift
  if (( s < 10 )); then echo "   not run: $s s left"; return 124; fi
  timeout "$s" "$@"
}

echo "== GPU tests ($(cap 150) s)"
tests="$out/H100-fused-append-tests.txt"
gpu_test() {  # PYTEST ARGS...: one test process, its output and exit status into $tests
  echo "-- $*" >> "$tests"
  within "$(cap 75)" python -m pytest -q -p no:cacheprovider "$@" >> "$tests" 2>&1
  echo "rc $?" >> "$tests"
}
gpu_test tests/test_kv_append_gpu.py
gpu_test tests/test_emitted_layer_gpu.py -k "topk or milestone"
tail -n 8 "$tests"

rules="nsa-mean-shared-b64 quest-ub-per-head-b64"
bench() {  # TREE STEM SECONDS: the step bench of TREE's code and tuning_db
  (cd "$1" && within "$3" env -u SPARSEGEN_TUNING_DB PYTHONPATH="$1:${PYTHONPATH:-}" \
    python bench/methods_gate_topk.py --rules $rules --batch 8 16 --seq-len 32768 131072 \
    --out "$out/$2") >> "$out/stages.log" 2>&1
  echo "   rc $?" | tee -a "$out/stages.log"
}
echo "== step bench, two launches (main, $old) ($(( $(left) / 2 )) s)"
bench "$old" H100-step-topk-two-launch "$(( $(left) / 2 ))"
echo "== step bench, one launch (this tree) ($(left) s)"
bench "$PWD" H100-step-topk-one-launch "$(left)"
grep -h "^| nsa\|^| quest" "$out"/H100-step-topk-*-launch.md 2>/dev/null || tail -n 20 "$out/stages.log"
