#!/usr/bin/env bash
# The whole test suite on aarch64 (a Raspberry Pi's architecture) from an x86-64 machine:
# every crate's tests cross-built for aarch64-unknown-linux-gnu and run under qemu-aarch64
# (user mode, no binfmt_misc needed), real MQTT brokers and gRPC over loopback included.
#
#   ./scripts/test-aarch64.sh            # build, then run as a Pi 4, then the int8/kernel tests as a Pi 5
#   ./scripts/test-aarch64.sh -E 'package(hearth-dense)'   # extra arguments go to nextest
#
# How: `cargo nextest archive` builds the tests (and the binaries some of them start) once;
# `cargo nextest run --archive-file` runs them with qemu-aarch64 as the target runner and
# builds nothing, so the workspace binaries can be replaced by wrappers first: tests that
# start `hearth-hub` & co. exec a path compiled in (CARGO_BIN_EXE_*), which the host kernel
# cannot run without binfmt_misc, so that path becomes a shell script that execs qemu-aarch64
# on the real binary (kept beside it as `<name>.aarch64`).
#
# First pass: QEMU_CPU=cortex-a72 (Pi 4: NEON, no dotprod: the SMULL/SADALP int8 kernel).
# Then the dense engine, the int8-vs-tract and kernel tests with their output, as a Pi 4 and
# as a Pi 5 (cortex-a76: dotprod, the SDOT kernel). Times are printed per step.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/aarch64-env.sh
triple=aarch64-unknown-linux-gnu
archive=target/aarch64-tests.tar.zst
t0=$(date +%s)

CARGO_INCREMENTAL=0 nice -n 10 cargo nextest archive --locked --workspace --target "$triple" \
  --archive-file "$archive"
t1=$(date +%s)

for bin in target/$triple/debug/hearth-* target/$triple/debug/bench-*; do
  [[ -f "$bin" && -x "$bin" && "$bin" != *.* ]] || continue
  # Cargo hard-links the binary from deps/: copy, then replace the link (never write through it).
  cp "$bin" "$bin.aarch64"
  rm "$bin"
  printf '#!/bin/sh\n# Written by scripts/test-aarch64.sh: run the aarch64 binary under qemu-user.\nexec qemu-aarch64 -L /usr/aarch64-linux-gnu "$0.aarch64" "$@"\n' >"$bin"
  chmod +x "$bin"
done

run() { # run <QEMU_CPU> <nextest args...>
  local cpu=$1; shift
  echo "== qemu-aarch64 -cpu $cpu: cargo nextest run $*" >&2
  QEMU_CPU=$cpu cargo nextest run --archive-file "$archive" --workspace-remap . \
    --no-fail-fast "$@"
}
status=0
run cortex-a72 "$@" || status=$?
t2=$(date +%s)
# The int8 kernels and the kernel report again, output shown: as a Pi 4, then as a Pi 5.
for cpu in cortex-a72 cortex-a76; do
  run "$cpu" --no-capture \
    -E 'package(hearth-dense) | binary(dense_engine) | binary(kernels)' || status=$?
done
t3=$(date +%s)
echo "aarch64 suite: build $((t1 - t0)) s, Pi 4 pass (cortex-a72) $((t2 - t1)) s," \
  "int8 and kernel tests as Pi 4 and Pi 5 $((t3 - t2)) s; exit $status" >&2
exit $status
