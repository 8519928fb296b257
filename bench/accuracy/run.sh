#!/usr/bin/env bash
# bench/accuracy — Hearth's models against aeon's MiniRocket, per task, one command.
#
#   bench/accuracy/run.sh [bench-accuracy options…]     (e.g. --tasks plaid --rounds 5)
#
# 1. bench/accuracy/.venv with pinned aeon (bench/accuracy/requirements.txt), if missing;
# 2. bench-accuracy (dev profile: hearth-model is built at opt-level 3 there): per task file,
#    Hearth central and federated (the demo's partitions, in-process FedAvg through the real
#    update codec) accuracy, model size f32 / int8, µs per window; writes the windows the
#    front end sees as .npy → target/bench-accuracy/hearth.json;
# 3. aeon_side.py: aeon's MiniRocketClassifier trained centrally on the same windows and
#    splits (3 seeds) → one table, bench/results/accuracy.{md,json}.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
venv="$here/.venv"
work="${BENCH_WORK:-$root/target/bench-accuracy}"
out="${BENCH_OUT:-$root/bench/results/accuracy}"

if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import aeon' 2>/dev/null; then
  echo "== creating $venv (pinned: $(grep -v '^#' "$here/requirements.txt" | xargs))" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -r "$here/requirements.txt"
fi

echo "== Hearth side (bench-accuracy)" >&2
cargo run --quiet -p hearth-bench --bin bench-accuracy -- --data "$root/data" --work "$work" "$@"
echo "== aeon side (MiniRocketClassifier, central)" >&2
cmd="bench/accuracy/run.sh${*:+ $*}"
"$venv/bin/python" "$here/aeon_side.py" --work "$work" --out "$out" --command "$cmd"
