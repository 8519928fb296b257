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
up=${UP:-4:0.1}
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
# The shortlist at 9 seeds (what the defaults were chosen on).
up_short="fp32 dense,int8 dense,int4 dense,1-bit dense,top-30% 1-bit,top-30% 1-bit +dgc,top-30% int4,top-10% 1-bit,top-10% 1-bit +warmup,top-10% 1-bit +dgc,top-10% int2,top-10% int2 +warmup,top-10% int4,top-3% 1-bit,top-3% 1-bit +warmup,top-3% int8 +warmup,top-3% int2 +warmup,top-1% 1-bit +warmup"
for m in 0 0.9; do
  opt=$([[ $m == 0 ]] && echo sgd || echo momentum)
  ONLY=$up_short MOMENTUM=$m STAGE=up CSV=$out/robust.csv "$bin/codec_sweep" digits 4 "$rounds" 9 | tee "$out/robust-up-$opt.txt"
  for u in 4:0.1 4:0.3; do
    l=$([[ $u == 4:0.1 ]] && echo "top-10% int4" || echo "top-30% int4")
    ONLY="$l / file,$l / int8 dense,$l / int4 dense,$l / top-30% int4,$l / top-10% int8,$l / top-10% int4,$l / top-10% 1-bit" \
      MOMENTUM=$m STAGE=down UP=$u CSV=$out/robust.csv "$bin/codec_sweep" digits 4 "$rounds" 9 | tee "$out/robust-down-$u-$opt.txt"
  done
done
"$bin/codec_plot" "$out/sweep.csv" up "$out/codec-uplink.svg"
"$bin/codec_plot" "$out/sweep.csv" down "$out/codec-downlink.svg"
