#!/usr/bin/env bash
# Cross-builds the Hearth binaries for a Raspberry Pi (aarch64-unknown-linux-gnu) from x86_64.
#
#   deploy/cross-aarch64.sh            # release binaries in target/aarch64-unknown-linux-gnu/release/
#   deploy/cross-aarch64.sh --test     # plus the whole test suite under qemu-aarch64
#                                      # (scripts/test-aarch64.sh)
#
# For packages (what a Pi installs) use ./scripts/package.sh arm64, which runs the same build.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(./scripts/release-build.sh arm64)
ls -l "$out"/hearth-{coordinator,hub,agent,compress}
if [[ "${1:-}" == "--test" ]]; then
  exec ./scripts/test-aarch64.sh
fi
