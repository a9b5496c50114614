#!/usr/bin/env bash
# The main job with no GPU: for every example spec, validate it, render and compile its
# kernels for sm_90a, and emit its torch package from the committed tuning database.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/main-job}
# through the interpreter pip installed into: a pyenv shim for the console script may not
# exist yet right after `pip install`
sparsegen() { python3 -m sparsegen.cli "$@"; }
mkdir -p "$out"
for spec in examples/specs/*.yaml; do
  name=$(basename "$spec" .yaml)
  echo "== $spec"
  sparsegen check "$spec" > "$out/$name.plan.yaml"
  sparsegen compile "$spec" --build-dir "$out/kernels"
  sparsegen build "$spec" -o "$out/$name"
done
echo "main job done: packages under $out/"
