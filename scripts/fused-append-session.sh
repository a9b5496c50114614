#!/usr/bin/env bash
# On an H100, decide the branch fused-append (the topk rule's KV append and metadata fold in
# one launch) in one device call of under 10 minutes:
#   1. tests/test_kv_append_gpu.py (the kernel path against the torch path bit for bit, bf16
#      included, and in a CUDA graph; never run on a GPU before) and tests/test_topk.py;
#   2. the re-tune of quest_meta (now the append, TritonKVAppend) and quest_score (its adapter
#      module changed, so its entries are stale) for nsa-topk and quest-topk, into a copy of
#      tuning_db/ (quest_score's studies start from the previous winners; quest_meta's space
#      is num_warps 1 / 2 / 4), packed into OUTDIR/tuning_db.tgz after each tune: first the
#      buckets stage 3 runs (B 8 / 16 at 32K, NSA's), then every bucket of both specs;
#   3. the topk decode step at 32K, B 8 and 16, NSA (mean_pooled, shared, block 64) and Quest
#      block 64 (upper_bound, per_head), side by side: OLDTREE (main: kv_append then
#      quest_meta_append, two launches) and this tree (one launch, at the re-tuned configs).
# Every stage runs whatever the one before did (each logs its exit status), under a share of
# one deadline (TOTAL seconds, default 570). TRIALS (default 4): candidates per kernel and
# bucket; TUNE_S (default 200): the tune stage's share.
#   bash scripts/fused-append-session.sh OUTDIR OLDTREE
# OLDTREE: main's code (`git archive main sparsegen templates bench tuning_db examples
# pyproject.toml | tar -x -C OLDTREE`). Bring the database back with `tar xzf tuning_db.tgz
# -C scratch/fa` and `python -m sparsegen.cli db merge --prefer newer scratch/fa/tuning_db`.
# The device tool brings back 8 files a call: OUTDIR holds 8 (the benches' output shares
# stages.log).
set -uo pipefail
usage="usage: scripts/fused-append-session.sh OUTDIR OLDTREE"
out=${1:?$usage}; old=${2:?$usage}
mkdir -p "$out" && out=$(cd "$out" && pwd)
old=$(cd "$old" 2>/dev/null && pwd) || { echo "OLDTREE $2 is not a directory; $usage" >&2; exit 2; }
[[ -f "$old/bench/methods_gate_topk.py" ]] || { echo "OLDTREE $old has no bench/; $usage" >&2; exit 2; }
cd "$(dirname "$0")/.."
source scripts/lib/deadline.sh 570
trials=${TRIALS:-4}
within() {  # SECONDS CMD...: CMD under that timeout; not run with under 10 s (timeout 0 = none)
  local s=$1; shift
  if (( s < 10 )); then echo "   not run: $s s left"; return 124; fi
  timeout "$s" "$@"
}

echo "== GPU tests ($(cap 120) s)"
within "$(cap 120)" python -m pytest -q -p no:cacheprovider --durations=5 \
  tests/test_kv_append_gpu.py tests/test_topk.py > "$out/H100-fused-append-tests.txt" 2>&1
echo "rc $?" >> "$out/H100-fused-append-tests.txt"
tail -n 3 "$out/H100-fused-append-tests.txt"

log="$out/H100-tune-fused-append.log"
dbroot=$(mktemp -d)
cp -r tuning_db "$dbroot/" || echo "could not copy tuning_db" | tee -a "$log"
tune_end=$(( $(date +%s) + $(cap "${TUNE_S:-200}") ))
tune() {  # SPEC [sparsegen tune options]: quest_meta and quest_score into the copy, packed
  local spec=$1 s=$(( tune_end - $(date +%s) )); shift
  if (( s < 20 )); then echo "== $spec $*: deferred (tune share spent)" | tee -a "$log"; return; fi
  echo "== $spec $* (--time-limit $s s)" | tee -a "$log"
  # a tune can run ~90 s past --time-limit (start-up, compiles, the trial in flight)
  within "$(cap $(( s + 60 )))" python -m sparsegen.cli tune "examples/specs/$spec.yaml" \
    --db "$dbroot/tuning_db" --kernels quest_meta quest_score --trials "$trials" --workers 8 \
    --time-limit "$s" "$@" >> "$log" 2>&1
  echo "   rc $?" | tee -a "$log"
  tar czf "$dbroot/db.tgz" -C "$dbroot" tuning_db && mv "$dbroot/db.tgz" "$out/tuning_db.tgz" \
    || echo "could not pack the database" | tee -a "$log"
}
tune nsa-topk --shapes b8_s32768 b16_s32768
tune nsa-topk
tune quest-topk

rules="nsa-mean-shared-b64 quest-ub-per-head-b64"
echo "== step bench, two launches (main, $old) ($(( $(left) / 2 )) s)"
(cd "$old" && within "$(( $(left) / 2 ))" env -u SPARSEGEN_TUNING_DB PYTHONPATH="$old" \
  python bench/methods_gate_topk.py --rules $rules --batch 8 16 --seq-len 32768 \
  --out "$out/H100-step-topk-32k-two-launch") > "$out/stages.log" 2>&1
echo "   rc $?" | tee -a "$out/stages.log"
echo "== step bench, one launch (this tree, the re-tuned database) ($(left) s)"
within "$(left)" env SPARSEGEN_TUNING_DB="$dbroot/tuning_db" PYTHONPATH="$PWD" \
  python bench/methods_gate_topk.py --rules $rules --batch 8 16 --seq-len 32768 \
  --out "$out/H100-step-topk-32k-one-launch" >> "$out/stages.log" 2>&1
echo "   rc $?" | tee -a "$out/stages.log"
grep -h "^| nsa\|^| quest" "$out"/H100-step-topk-32k-*.md 2>/dev/null || tail -n 20 "$out/stages.log"
