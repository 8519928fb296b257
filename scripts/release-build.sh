#!/usr/bin/env bash
# The release build of Hearth's four shipped binaries for one architecture:
#
#   scripts/release-build.sh [amd64|arm64]     # prints the directory that holds them
#
# Used by scripts/package.sh, bench/footprint and deploy/cross-aarch64.sh with the same package
# set, so cargo's feature unification is the same and one build per target serves them all
# (a cold release build takes ~10 minutes per target on 2 cores; later runs reuse it).
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-$(dpkg --print-architecture)}
host=$(rustc -vV | sed -n 's/^host: //p')
case "$arch" in
  amd64) triple=x86_64-unknown-linux-gnu ;;
  arm64) triple=aarch64-unknown-linux-gnu ;;
  *) echo "usage: $0 [amd64|arm64]" >&2; exit 64 ;;
esac
build=(cargo build --release --locked)
for b in hearth-coordinator hearth-hub hearth-agent hearth-compress; do build+=(-p "$b"); done
build+=(--bins)
if [[ "$triple" == "$host" ]]; then
  out=target/release
else
  [[ "$arch" == arm64 ]] && source deploy/aarch64-env.sh
  build+=(--target "$triple")
  out=target/$triple/release
fi
echo "building: ${build[*]}" >&2
CARGO_INCREMENTAL=0 nice -n 10 "${build[@]}" >&2
echo "$out"
