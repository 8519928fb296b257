#!/usr/bin/env bash
# Fuzzes every parser of untrusted input for a fixed budget with cargo-fuzz (libFuzzer) and
# prints a summary. Not part of ./scripts/test.sh (it takes minutes and its own build).
#
#   ./scripts/fuzz.sh                 # every target, FUZZ_SECS (60) seconds each
#   FUZZ_SECS=10 ./scripts/fuzz.sh rules event_payload
#   FUZZ_SANITIZER=none ./scripts/fuzz.sh      # no AddressSanitizer (faster build)
#
# Budget: FUZZ_SECS per target (7 targets: 7 min at the default) plus the first build
# (~20-40 min on 2 quiet cores: every dependency is built again with coverage instrumentation
# under fuzz/target/<sanitizer>; later runs reuse it). Memory: libFuzzer's -rss_limit_mb (FUZZ_RSS_MB,
# 1024) and -malloc_limit_mb (FUZZ_MALLOC_MB, 256: one allocation above it is reported as
# a failure, so a few input bytes can never make a decoder allocate gigabytes).
# Exit status: 0 when no target found a crash, a leak, a timeout or an over-limit allocation.
#
# cargo-fuzz passes nightly `-Z` flags; the project's toolchain is stable, so
# RUSTC_BOOTSTRAP=1 lets the stable compiler accept them (no nightly toolchain needed).
# AddressSanitizer (FUZZ_SANITIZER=address, the default) finds over-limit allocations through
# its allocator; FUZZ_SANITIZER=none builds faster and still catches panics and RSS growth.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

SECS=${FUZZ_SECS:-60}
RSS_MB=${FUZZ_RSS_MB:-1024}
MALLOC_MB=${FUZZ_MALLOC_MB:-256}
SANITIZER=${FUZZ_SANITIZER:-address}
ALL=(update_codec package task_file formats rules event_payload state_files)
if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL[@]}"); fi

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz not found: installing it with cargo" >&2
  cargo install --locked cargo-fuzz
fi

export CARGO_INCREMENTAL=0
# One build directory per sanitizer (switching keeps the other build).
target_dir=${FUZZ_TARGET_DIR:-$root/fuzz/target/$SANITIZER}
echo "== building fuzz targets (sanitizer: $SANITIZER, in $target_dir): ${TARGETS[*]}"
build_start=$(date +%s)
if [ $# -gt 0 ]; then
  for t in "${TARGETS[@]}"; do
    (cd fuzz && cargo fuzz build -O --sanitizer "$SANITIZER" --target-dir "$target_dir" "$t")
  done
else
  # Every bin of fuzz/ is a fuzz target (the seed writer is not: see below).
  (cd fuzz && cargo fuzz build -O --sanitizer "$SANITIZER" --target-dir "$target_dir")
fi
build_secs=$(($(date +%s) - build_start))
echo "== fuzz targets built in ${build_secs}s"
bin_dir=$target_dir/x86_64-unknown-linux-gnu/release

# Seed corpora from real files: binary formats written by the real encoders, text formats
# copied from the repository (task files, rules, data files, sample event payloads).
# The binary seeds come from `compress/examples/fuzz_seeds.rs`, an ordinary program of the main
# workspace (dev profile, its target/): built by cargo-fuzz with the fuzz crate's coverage
# flags it would not link (`__sancov_lowest_stack` lives in libFuzzer, which only fuzz
# targets link).
seeds=fuzz/seeds
rm -rf "$seeds" && mkdir -p "$seeds"
case " ${TARGETS[*]} " in
  *" update_codec "* | *" package "* | *" state_files "*)
    echo "== writing binary seeds"
    cargo run --quiet --locked -p hearth-compress --example fuzz_seeds -- "$seeds"
    ;;
esac
mkdir -p "$seeds"/{task_file,formats,rules,event_payload}
for t in data/*/task.toml model/tests/fixtures/*.toml; do
  [ -f "$t" ] && cp "$t" "$seeds/task_file/$(echo "$t" | tr / _)"
done
for r in deploy/config/rules.toml hub/rules.example.toml; do
  cp "$r" "$seeds/rules/$(basename "$r")"
done
# formats: first byte picks the parser (0 npy, 1 npz, 2 ts, 3 csv with header, 4 without).
{ printf '\x01'; cat model/tests/fixtures/small.npz; } > "$seeds/formats/npz"
python3 - "$seeds/formats" <<'PY'
import sys, zipfile, io
out = sys.argv[1]
z = zipfile.ZipFile("model/tests/fixtures/small.npz")
for n in z.namelist():
    open(f"{out}/npy_{n}", "wb").write(b"\x00" + z.read(n))
PY
for ts in data/gunpoint/GunPoint_TEST.ts data/basicmotions/BasicMotions_TEST.ts; do
  { printf '\x02'; head -c 6000 "$ts"; } > "$seeds/formats/ts_$(basename "$ts")"
done
for csv in data/digits/test.csv data/faces/test.csv; do
  { printf '\x03'; head -c 4000 "$csv"; } > "$seeds/formats/csv_$(basename "$(dirname "$csv")")"
done
n=0
for p in '{"class":"person","score":0.93,"model":"faces@3","ts":"2026-01-01T12:00:00Z"}' \
         '{"class":"microwave","score":1,"model":"plaid@1","ts":"2026-11-30T08:15:02.5+01:00"}' \
         '{"class":"x","score":0.5,"model":"m","ts":"t","extra":[1,2,3]}'; do
  n=$((n + 1))
  printf 'hearth/kitchen-1/event/verdict\0%s' "$p" > "$seeds/event_payload/p$n"
done

mkdir -p fuzz/corpus fuzz/artifacts
logs=fuzz/logs && mkdir -p "$logs"
failed=0
summary=()
for t in "${TARGETS[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" "$seeds/$t"
  echo "== $t: ${SECS}s"
  set +e
  "$bin_dir/$t" "fuzz/corpus/$t" "$seeds/$t" \
    -artifact_prefix="fuzz/artifacts/$t/" \
    -max_total_time="$SECS" -rss_limit_mb="$RSS_MB" -malloc_limit_mb="$MALLOC_MB" \
    -timeout=10 -max_len=65536 -print_final_stats=1 >"$logs/$t.log" 2>&1
  rc=$?
  set -e
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t.log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$logs/$t.log" | tail -1 | grep -o '[0-9]*' || echo '?')
  ft=$(grep -o 'ft: [0-9]*' "$logs/$t.log" | tail -1 | grep -o '[0-9]*' || echo '?')
  corp=$(grep -o 'corp: [0-9]*' "$logs/$t.log" | tail -1 | grep -o '[0-9]*' || echo '?')
  peak=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$logs/$t.log" | grep -o '[0-9]*$' || echo '?')
  if [ "$rc" -eq 0 ]; then verdict=ok; else verdict="FAILED (exit $rc, see $logs/$t.log, fuzz/artifacts/$t/)"; failed=1; fi
  summary+=("$(printf '| %-13s | %4ss | %10s | %5s | %6s | %6s | %6s | %s |' "$t" "$SECS" "$runs" "$cov" "$ft" "$corp" "$peak" "$verdict")")
done

echo
echo "== fuzz summary (budget ${SECS}s per target, rss ${RSS_MB} MB, malloc ${MALLOC_MB} MB, sanitizer $SANITIZER, build ${build_secs}s)"
echo "| target        | time  |       runs |   cov |     ft | corpus | RSS MB | result |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${summary[@]}"
exit $failed
