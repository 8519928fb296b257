#!/usr/bin/env bash
# bench/federation: Hearth beside Flower 1.41 on sklearn digits (MLP 64-32-10), one command:
#
#   bench/federation/run.sh [bench.py options, e.g. --optimizers sgd --hearth-settings default]
#
# Builds the release binaries (coordinator, hub, agent), installs Flower into a venv with pip,
# exports the agents' partitions and the initial weights, then runs both sides as separate
# processes with byte-counting proxies and prints the table (see bench.py, README.md).
# Takes ~15 minutes on 2 cores after the release build (Flower's ~20 s rounds dominate).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=bench/federation/.venv
if [[ ! -x $venv/bin/flower-superlink ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r bench/federation/requirements.txt
fi
echo "building the release binaries ..." >&2
CARGO_INCREMENTAL=0 nice -n 10 cargo build --release -p hearth-coordinator -p hearth-hub -p hearth-agent --bins >&2
work=target/bench-federation
mkdir -p "$work"
CARGO_INCREMENTAL=0 nice -n 10 cargo run --release -q -p hearth-model --example fed_export -- \
  digits 4 0.5 42 7 "$work/exported" >&2
echo "machine: $(nproc) cores, load before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$work/load.txt"
"$venv/bin/python" bench/federation/bench.py --bindir "$PWD/target/release" --venv "$PWD/$venv" \
  --exported "$PWD/$work/exported" --work "$PWD/$work" "$@"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$work/load.txt"
