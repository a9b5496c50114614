#!/usr/bin/env bash
# On an H100, the Quest block-16 work bench/NOTES.md has carried since Session 13, in one
# device call of under 10 minutes (each stage under its own share of one deadline, its
# results written under OUTDIR as it ends, so a cut-off call still brings back the stages
# done):
#   1. tests/test_select_tilelang_gpu.py (the 7-row union case, a GQA group of 28 / 4
#      heads, has never run on a GPU);
#   2. bench/profile_methods.py --parts quest-b16 --batch 8: where the Quest block-16 step's
#      ~0.19 ms of selection goes, kernel by kernel;
#   3. bench/block_select_tilelang_probe.py --quest-only: the whole Quest select, Triton and
#      TileLang, on random scores and on Quest's bounds of the step bench's cache;
#   4. the quest-topk b16_s131072 block_select bucket, the one the Session 13 re-tune lost
#      (tuning_db/ packed into OUTDIR/tuning_db.tgz: bring it back with `tar xzf … -C
#      scratch/q` and `python -m sparsegen.cli db merge scratch/q/tuning_db`).
#   scripts/quest-b16-session.sh OUTDIR
# The device tool brings back 8 files a call: OUTDIR holds 7 (the stage logs share one file,
# the tune log is appended to tune.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/quest-b16-session.sh OUTDIR}
mkdir -p "$out"
source scripts/lib/deadline.sh 560

echo "== select GPU tests ($(cap 150) s)"
timeout "$(cap 150)" python -m pytest -q -p no:cacheprovider --durations=3 \
  tests/test_select_tilelang_gpu.py > "$out/H100-gpu-tests-tilelang-select-7rows.txt" 2>&1
echo "rc $?" >> "$out/H100-gpu-tests-tilelang-select-7rows.txt"
tail -n 2 "$out/H100-gpu-tests-tilelang-select-7rows.txt"
echo "== profile quest-b16 ($(cap 100) s)"
OUT="$out" timeout "$(cap 100)" python bench/profile_methods.py --parts quest-b16 --batch 8 \
  > "$out/stages.log" 2>&1
tail -n 25 "$out/stages.log"
echo "== Quest select probe ($(cap 110) s)"
timeout "$(cap 110)" python bench/block_select_tilelang_probe.py --quest-only \
  --out "$out/H100-block-select-quest-only-probe" >> "$out/stages.log" 2>&1
grep "|" "$out"/H100-block-select-quest-only-probe.md 2>/dev/null || tail -n 5 "$out/stages.log"
echo "== tune quest-topk block_select b16_s131072 ($(cap 190) s)"
logs=$(mktemp -d)
SAVE_DB="$out/tuning_db.tgz" SPECS="quest-topk" timeout "$(cap 190)" \
  scripts/tune-examples.sh 100 "$logs" --trials 12 --workers 8 \
  --kernels block_select --shapes b16_s131072 > "$out/tune.txt" 2>&1
cat "$out/tune.txt"
cat "$logs/quest-topk.log" >> "$out/tune.txt" 2>/dev/null
