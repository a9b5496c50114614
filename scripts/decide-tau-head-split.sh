#!/usr/bin/env bash
# On an H100, decide the branch tau-head-split (entmax_tau's TileLang solve with a query head's
# passes split over several warps, `head_split`; merged in session 17 on what these calls
# measured, kept to reproduce bench/results/*head-split*) in two device calls of under 10
# minutes:
#   scripts/decide-tau-head-split.sh check OUTDIR
#     1. tests/test_entmax_tilelang_gpu.py in three pytest processes side by side (~61 tests,
#        exact against the torch rule; split, cluster and plain configs);
#     2. bench/entmax_tau_tilelang_probe.py at B8 / 128K and B8 / 32K: the split forms beside
#        the one-warp form and the Triton pair, and the cuts (no Halley steps, 2-block rows)
#        that tell the solve from the scoring;
#   scripts/decide-tau-head-split.sh tune OUTDIR
#     3. re-tune entmax_tau for both entmax specs (its entries are stale on the branch: each
#        study measures the previous winner at head_split 0 and 1 beside the seeds), packing
#        tuning_db/ into OUTDIR/tuning_db.tgz after each spec;
#     4. the decode-step bench with the tau forms side by side (--tau-ab).
# Then, here: untar the tuning_db, `python -m sparsegen.cli db prune --stale`, and merge the
# branch if the probe and the step moved (bench/NOTES.md, Session 15).
# Each stage gets a share of one deadline (TOTAL seconds, default 560). EXTRA_TESTS (pytest
# arguments) runs one more pytest process in check's test stage, so the probe times an idle GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/decide-tau-head-split.sh check|tune OUTDIR"
stage=${1:?$usage}; out=${2:?$usage}
mkdir -p "$out"
source scripts/lib/deadline.sh 560

case "$stage" in
  check)
    echo "== GPU tests ($(cap 300) s)"
    t=$(cap 300)
    timeout "$t" python -m pytest -q -p no:cacheprovider -k "exact and not split" \
      tests/test_entmax_tilelang_gpu.py > "$out/gpu-tests-exact.txt" 2>&1 & a=$!
    timeout "$t" python -m pytest -q -p no:cacheprovider -k "exact and split" \
      tests/test_entmax_tilelang_gpu.py > "$out/gpu-tests-exact-split.txt" 2>&1 & b=$!
    timeout "$t" python -m pytest -q -p no:cacheprovider -k "not exact" \
      tests/test_entmax_tilelang_gpu.py > "$out/gpu-tests-rest.txt" 2>&1 & c=$!
    d=""
    if [ -n "${EXTRA_TESTS:-}" ]; then   # another branch's GPU tests, beside these, before the probe
      timeout "$t" python -m pytest -q -p no:cacheprovider $EXTRA_TESTS \
        > "$out/gpu-tests-extra.txt" 2>&1 & d=$!
    fi
    wait "$a" "$b" "$c" $d   # wait on the PIDs: a pgrep on the command line matches itself
    tail -n 1 "$out"/gpu-tests-*.txt
    echo "== probe ($(cap 200) s)"
    timeout "$(cap 200)" python bench/entmax_tau_tilelang_probe.py --batch 8 \
      --seq-len 131072 32768 --forms "bj64 s3 w8" "bj128 s2 w16" cut "!cluster" \
      --out "$out/H100-entmax-tau-tilelang-head-split-probe" > "$out/probe.log" 2>&1
    grep "|" "$out"/*probe.md
    ;;
  tune)
    echo "== tune entmax_tau ($(cap 330) s)"
    logs=$(mktemp -d)   # the specs' logs end up in tune.txt: 8 files come back a call
    SAVE_DB="$out/tuning_db.tgz" SPECS="dash-entmax-90 dash-entmax" timeout "$(cap 330)" \
      scripts/tune-examples.sh 240 "$logs" --trials 4 --workers 8 --kernels entmax_tau \
      > "$out/tune.txt" 2>&1
    cat "$out/tune.txt"
    cat "$logs"/*.log >> "$out/tune.txt" 2>/dev/null
    echo "== decode step ($(cap 120) s)"
    timeout "$(cap 120)" python bench/methods_entmax_milestone.py --parts decode --tau-ab \
      --out "$out/H100-entmax-decode-tau-head-split" > "$out/decode.log" 2>&1
    grep "|" "$out"/*decode*.md | head -20
    ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
