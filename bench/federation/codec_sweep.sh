#!/usr/bin/env bash
# The codec sweep behind the coordinator's default codec settings (BENCHMARKS.md, "Codec
# sweep"): the in-process federated simulation (hearth-model's `fedsim`, the real codec) on
# digits, MLP 64-32-10, 4 non-IID clients, 10 rounds, 1 local epoch, lr 0.1, batch 32, 3
# seeds, plain SGD and momentum 0.9; every uplink setting with whole-file downloads, then
# every downlink setting under the uplink `UP` (default: the shipped default). Writes
# target/codec-sweep/{up,down}-{sgd,momentum}.txt, sweep.csv and the two SVG curves
# (drawn by the coordinator's plot code). About 10 minutes on 2 busy cores after the build.
#
#   bench/federation/codec_sweep.sh [rounds] [seeds]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-10}
seeds=${2:-3}
up=${UP:-1:0.03}
out=target/codec-sweep
mkdir -p "$out"
rm -f "$out/sweep.csv"
export CARGO_INCREMENTAL=0
cargo build -q -p hearth-model --example codec_sweep
cargo build -q -p hearth-coordinator --example codec_plot
bin=target/debug/examples
for m in 0 0.9; do
  opt=$([[ $m == 0 ]] && echo sgd || echo momentum)
  MOMENTUM=$m STAGE=up CSV=$out/sweep.csv "$bin/codec_sweep" digits 4 "$rounds" "$seeds" | tee "$out/up-$opt.txt"
  MOMENTUM=$m STAGE=down UP=$up CSV=$out/sweep.csv "$bin/codec_sweep" digits 4 "$rounds" "$seeds" | tee "$out/down-$opt.txt"
done
"$bin/codec_plot" "$out/sweep.csv" up "$out/codec-uplink.svg"
"$bin/codec_plot" "$out/sweep.csv" down "$out/codec-downlink.svg"
