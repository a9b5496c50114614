#!/usr/bin/env bash
# On an H100, Session 24's two device calls for the step rows nearest their targets, each
# under 10 minutes (stages under shares of one deadline, results written under OUTDIR as
# each stage ends):
#
#   scripts/short-rows-session.sh tune OUTDIR
#     1. the new example quest-topk-b64 (Quest's upper bound over 64-token blocks): its rule
#        kernels (quest_meta, quest_score, block_select) tuned at every bucket; its attention
#        is seer-attention-r's (same statics), already tuned. Until now the step bench's Quest
#        block-64 rows ran these kernels at their defaults (no example shared their statics).
#     2. nsa-topk's scoring and selection at the 32K buckets searched further (--retune; 4-7
#        trials had been measured there), the NSA B16 / 32K row being at 7x within noise;
#     3. the entmax decode attention at the buckets of the entmax rows short of 0.8 of ideal
#        by a few per cent (dash-entmax-90 b8_s131072: 11 trials; dash-entmax b8_s32768: 24).
#     tuning_db/ is packed into OUTDIR/tuning_db.tgz after each stage.
#
#   scripts/short-rows-session.sh topk OUTDIR
#     where one call is all the device gives: stages 1 and 2 with fewer trials and buckets
#     (batch 8 / 16), then the topk step bench of their 32K rows at the tuned configs (no
#     before / after pair).
#
#   scripts/short-rows-session.sh rest OUTDIR
#     Session 25's second call: quest-topk-b64's block_select at the batch-16 buckets the first
#     tune left, entmax_tau searched further at the two batch-8 buckets whose entmax rows are
#     within a few per cent of 0.8 of ideal, then those rows' step benches (tuned only).
#
#   scripts/short-rows-session.sh quest-score OUTDIR
#     Session 25's third call: quest-topk-b64's quest_score re-searched to 32 trials at 32K
#     (8 had found the default best), then the 32K topk step rows.
#
#   scripts/short-rows-session.sh bench OUTDIR OLDDB
#     the step benches of those rows, side by side in one call: OLDDB (the database before
#     the tune: an absolute path to a tuning_db directory) and this tree's tuning_db/.
#
# Bring the tune back with `tar xzf OUTDIR/tuning_db.tgz -C scratch/t` and
# `python -m sparsegen.cli db merge --prefer newer scratch/t/tuning_db`.
set -uo pipefail
usage="usage: scripts/short-rows-session.sh tune OUTDIR | topk OUTDIR | rest OUTDIR | quest-score OUTDIR | bench OUTDIR OLDDB"
mode=${1:?$usage}; out=${2:?$usage}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
source scripts/lib/deadline.sh 570
within() {  # SECONDS CMD...: CMD under that timeout; not run with under 10 s
  local s=$1; shift
  if (( s < 10 )); then echo "   not run: $s s left"; return 124; fi
  timeout "$s" "$@"
}
tune() {  # SPEC SECONDS TUNE-ARGS...: one spec's tune, its log appended to tune.txt
  local spec=$1 s=$2; shift 2
  echo "== tune $spec $* ($s s)" | tee -a "$out/tune.txt"
  within "$s" python -m sparsegen.cli tune "examples/specs/$spec.yaml" --workers 8 \
    --time-limit $(( s > 60 ? s - 45 : s )) "$@" >> "$out/tune.txt" 2>&1
  echo "   rc $?" | tee -a "$out/tune.txt"
  grep "^tuned\|^deferred" "$out/tune.txt" | tail -n 12
  tar czf "$out/tuning_db.tgz.tmp" tuning_db && mv "$out/tuning_db.tgz.tmp" "$out/tuning_db.tgz"
}

case "$mode" in
  tune)
  tune quest-topk-b64 "$(cap 300)" --trials 16 --kernels quest_meta quest_score block_select
  tune nsa-topk "$(cap 100)" --retune --trials 24 --kernels quest_score block_select \
    --shapes b8_s32768 b16_s32768
  tune dash-entmax-90 "$(( $(left) / 2 ))" --retune --trials 40 --kernels entmax_decode \
    --shapes b8_s131072
  tune dash-entmax "$(left)" --retune --trials 48 --kernels entmax_decode --shapes b8_s32768
  ;;
  topk)  # when only one call is to be had: the topk tunes (fewer trials), then their 32K step bench
  tune quest-topk-b64 "$(( $(left) * 40 / 100 ))" --trials 8 --kernels quest_meta quest_score \
    block_select --shapes b8_s32768 b16_s32768 b8_s131072 b16_s131072
  tune nsa-topk "$(( $(left) * 25 / 100 ))" --retune --trials 16 --kernels quest_score \
    block_select --shapes b8_s32768 b16_s32768
  echo "== topk step at 32K, tuned ($(left) s)"
  within "$(left)" python bench/methods_gate_topk.py --rules quest-ub-per-head-b64 \
    nsa-mean-shared-b64 --batch 8 16 --seq-len 32768 \
    --out "$out/H100-step-topk-after-tune" > "$out/stages.log" 2>&1
  echo "   rc $?"
  grep -h "^| nsa\|^| quest" "$out"/H100-step-topk-after-tune.md 2>/dev/null | cut -c1-220
  tail -n 5 "$out/stages.log"
  ;;
  rest)
  # Session 25's second tune: what the first left, then the rows it touches (tuned only)
  tune quest-topk-b64 "$(cap 170)" --trials 16 --kernels block_select --shapes b16_s32768 b16_s131072
  tune dash-entmax-90 "$(cap 110)" --retune --trials 24 --kernels entmax_tau --shapes b8_s131072
  tune dash-entmax "$(cap 100)" --retune --trials 24 --kernels entmax_tau --shapes b8_s32768
  log=$(mktemp)
  s=$(( $(left) * 4 / 10 )); echo "== Quest b64 step, B16 ($s s)"
  within "$s" python bench/methods_gate_topk.py --rules quest-ub-per-head-b64 --batch 16 \
    --seq-len 32768 131072 --out "$out/H100-step-quest-b64-b16-tuned" >> "$log" 2>&1
  echo "   rc $?"
  grep -h "^| quest" "$out"/H100-step-quest-b64-b16-tuned.md 2>/dev/null | cut -c1-220
  s=$(left); echo "== entmax decode, B8 ($s s)"
  within "$s" python bench/methods_entmax_milestone.py --parts decode --shapes 8x32768 8x131072 \
    --out "$out/H100-entmax-decode-b8-tau-retuned" >> "$log" 2>&1
  echo "   rc $?"
  grep -h "^| " "$out"/H100-entmax-decode-b8-tau-retuned.md 2>/dev/null | cut -c1-220 | head -14
  tail -n 12 "$log"
  ;;
  quest-score)
  # Session 25's third call: Quest b64's scoring searched further at 32K, then its rows
  tune quest-topk-b64 "$(( $(left) * 55 / 100 ))" --retune --trials 32 --kernels quest_score \
    --shapes b16_s32768 b8_s32768
  echo "== topk step at 32K ($(left) s)"
  within "$(left)" python bench/methods_gate_topk.py --rules quest-ub-per-head-b64 \
    nsa-mean-shared-b64 --batch 16 8 --seq-len 32768 \
    --out "$out/H100-step-32k-quest-b64-score-retuned" > "$out/stages.log" 2>&1
  echo "   rc $?"
  grep -h "^| nsa\|^| quest" "$out"/H100-step-32k-quest-b64-score-retuned.md 2>/dev/null | cut -c1-220
  ;;
  bench)
  old=${3:?$usage}
  [[ -d "$old" && "$old" == /* ]] || { echo "OLDDB must be an absolute path to a tuning_db directory, got '$old'; $usage" >&2; exit 2; }
  log=$(mktemp)   # the stages' output: its tail is printed, the 8 files OUTDIR may hold are the results
  topk="python bench/methods_gate_topk.py --rules quest-ub-per-head-b64 nsa-mean-shared-b64 --batch 8 16 --seq-len 32768 131072"
  entmax="python bench/methods_entmax_milestone.py --parts decode --shapes 8x32768 8x131072"
  s=$(( $(left) * 3 / 10 )); echo "== topk step, before ($s s)"
  SPARSEGEN_TUNING_DB="$old" within "$s" $topk --out "$out/H100-step-topk-before-tune" >> "$log" 2>&1
  echo "   rc $?"
  s=$(( $(left) * 3 / 7 )); echo "== topk step, after ($s s)"
  SPARSEGEN_TUNING_DB="$PWD/tuning_db" within "$s" $topk --out "$out/H100-step-topk-after-tune" >> "$log" 2>&1
  echo "   rc $?"
  grep -h "^| nsa\|^| quest" "$out"/H100-step-topk-*-tune.md 2>/dev/null | cut -c1-220
  s=$(( $(left) / 2 )); echo "== entmax decode, before ($s s)"
  SPARSEGEN_TUNING_DB="$old" within "$s" $entmax --out "$out/H100-entmax-decode-before-tune" >> "$log" 2>&1
  echo "   rc $?"
  s=$(left); echo "== entmax decode, after ($s s)"
  SPARSEGEN_TUNING_DB="$PWD/tuning_db" within "$s" $entmax --out "$out/H100-entmax-decode-after-tune" >> "$log" 2>&1
  echo "   rc $?"
  grep -h "^| " "$out"/H100-entmax-decode-*-tune.md 2>/dev/null | cut -c1-220 | head -20
  tail -n 30 "$log"
  ;;
*) echo "$usage" >&2; exit 2 ;;
esac
