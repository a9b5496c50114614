#!/usr/bin/env bash
# Tune the example specs on this GPU into tuning_db/, within one time budget (e.g. after a
# template edit stales their entries: each study starts from the winner the previous version
# of its kernel recorded, so a small --trials budget re-tunes). Needs a CUDA GPU.
#
#   scripts/tune-examples.sh SECONDS LOGDIR [tune options...]
#   e.g. scripts/tune-examples.sh 540 /tmp/logs --trials 4 --kernels sparse_decode
#
# Specs run in the order of $SPECS (default: every example; --kernels must name kernels each
# of them has). What the budget does not reach is left for the next run (deferred).
# SAVE_DB=FILE.tgz: after each spec, tuning_db/ is packed into that one file (on a lent
# device, write it under $OUT: the device's tree is reset at the next call and only a
# limited number of files come back, so a tuned file not packed is lost). Bring it back with
# `tar xzf FILE.tgz -C scratch/x` and `sparsegen db merge --prefer newer scratch/x/tuning_db`:
# the pack is a copy of the whole database, and with --retune a new winner can time a little
# slower than the old one did in an earlier run, so the default `faster` would drop it.
# The budget bounds the tuning; a spec can end up to ~90 s past it (start-up, compiles, the
# trial in flight; 50-85 s seen on the H100 in session 13): keep that margin under a device
# call's limit, or the call is cut off before it packs anything.
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/tune-examples.sh SECONDS LOGDIR [sparsegen tune options...]"
budget=${1:?$usage}; logs=${2:?$usage}; shift 2
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "SECONDS must be a whole number of seconds, got '$budget'; $usage" >&2; exit 2; }
mkdir -p "$logs"
deadline=$(( $(date +%s) + budget ))
specs=${SPECS:-$(ls examples/specs/*.yaml | xargs -n1 basename | sed 's/\.yaml$//')}
for name in $specs; do
  left=$(( deadline - $(date +%s) ))
  if (( left < 20 )); then echo "== $name: deferred (time budget spent)"; continue; fi
  echo "== $name ($left s left)"
  start=$(date +%s)
  python3 -m sparsegen.cli tune "examples/specs/$name.yaml" --time-limit "$left" "$@" \
    > "$logs/$name.log" 2>&1
  rc=$?
  echo "   rc $rc, $(( $(date +%s) - start )) s; $(tail -n 1 "$logs/$name.log")"
  if [[ -n "${SAVE_DB:-}" ]]; then
    tar czf "$SAVE_DB.tmp" tuning_db && mv "$SAVE_DB.tmp" "$SAVE_DB" || echo "   could not pack tuning_db into $SAVE_DB" >&2
  fi
done
