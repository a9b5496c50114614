#!/usr/bin/env bash
# On an H100, decide a block_select change on a branch (tilelang-select, landed in session 12;
# tilelang-union, landed in session 13) in one device call (under 10 minutes in all):
#   1. the TileLang top-k's GPU tests (bit for bit against the torch selection; on a cold
#      machine they take ~2 minutes, most of it compiling the union kernels);
#   2. bench/block_select_tilelang_probe.py: TileLang vs the tuned Triton block_select, same run;
#   3. re-tune block_select for every example spec that has one (its entries are stale on this
#      branch: each study measures the previous winner, the default and the two TileLang
#      seeds), packing tuning_db/ into OUTDIR after each spec;
#   4. the decode-step bench at the new winners (RULES, default the Quest per-head rules at
#      block 16 and 64, the ones the union kernel serves; it times each step with the
#      Triton select too, same run).
# Each stage gets a share of one deadline (TOTAL seconds, default 570), so a slow stage
# shortens the later ones instead of losing the call.
#   scripts/decide-tilelang-select.sh OUTDIR
# The device tool brings back 8 files a call: OUTDIR holds 8 (the probe's and the
# step bench's output share stages.log, the tune logs tune.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/decide-tilelang-select.sh OUTDIR}
mkdir -p "$out"
source scripts/lib/deadline.sh 570

echo "== GPU tests ($(cap 240) s)"
timeout "$(cap 240)" python -m pytest -q -x -p no:cacheprovider tests/test_select_tilelang_gpu.py \
  > "$out/gpu-tests.txt" 2>&1
tests_rc=$?
tail -3 "$out/gpu-tests.txt"
tune_logs=$(mktemp -d)   # each spec's tune log is appended to one file, tune.txt
echo "== probe ($(cap 110) s)"
timeout "$(cap 110)" python bench/block_select_tilelang_probe.py --out "$out/H100-block-select-tilelang" \
  > "$out/stages.log" 2>&1
echo "   rc $?"; tail -12 "$out/stages.log"
if (( tests_rc != 0 )); then tail -40 "$out/gpu-tests.txt"; echo "GPU tests failed (rc $tests_rc): no tune"; exit 1; fi
for pair in seer-attention-r:70 quest-topk:65 nsa-topk:50; do
  spec=${pair%%:*}; s=$(cap "${pair##*:}")
  (( s < 20 )) && { echo "== $spec: deferred"; continue; }
  # a spec's tune can run ~90 s past its budget (tune-examples.sh): the deadline is held by
  # timeout, which loses only the spec in flight (the ones before are packed already)
  SAVE_DB="$out/tuning_db.tgz" SPECS="$spec" timeout "$(left)" \
    scripts/tune-examples.sh "$s" "$tune_logs" --trials 4 --workers 8 --kernels block_select
  cat "$tune_logs/$spec.log" >> "$out/tune.txt" 2>/dev/null
done
s=$(left)
echo "== step bench ($s s)"
(( s > 30 )) && timeout "$s" python bench/methods_gate_topk.py \
  --rules ${RULES:-quest-ub-per-head-b16 quest-ub-per-head-b64} \
  --out "$out/H100-step-gate-topk" >> "$out/stages.log" 2>&1
tail -25 "$out/stages.log"
